"""The fused operations, one folder each: plain-torch reference beside every backend."""
