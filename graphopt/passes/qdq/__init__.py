"""qdq: mixed-precision quantization. The pass (qdq.py) chooses per site among float, static int8, dynamic int8
and int4 weight-only; sites.py finds the sites and inserts QuantizeLinear/DequantizeLinear; dynamic.py, int4.py
rewrite to the dynamic and int4 forms; smooth.py (activation smoothing), bias_correction.py and quant.py (integer
arithmetic) serve them.

May import: passes.base, analysis, core. Never another pass family.
"""

from .qdq import QDQ

__all__ = ["QDQ"]
