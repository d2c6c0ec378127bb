"""ropebert.kernels"""
