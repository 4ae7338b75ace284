"""jaxrl.sharding"""
