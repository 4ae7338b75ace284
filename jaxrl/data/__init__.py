"""jaxrl.data"""
