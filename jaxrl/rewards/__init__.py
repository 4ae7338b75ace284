"""jaxrl.rewards"""
