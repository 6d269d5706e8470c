"""wanpair: train the high-noise + low-noise LoRA pair that Wan 2.2 T2V A14B needs."""

__version__ = "0.1.0"
