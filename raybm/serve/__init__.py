"""Serving: the Ray Serve application, its HTTP contract, deploying it and calling it."""
