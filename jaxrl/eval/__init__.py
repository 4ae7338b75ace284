"""jaxrl.eval"""
