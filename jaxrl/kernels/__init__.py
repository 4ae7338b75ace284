"""jaxrl.kernels"""
