"""Serving on Ray Serve: a FastAPI ingress around a loaded artifact, options applied by a typed builder."""
