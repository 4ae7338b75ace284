"""jaxrl.sampling"""
