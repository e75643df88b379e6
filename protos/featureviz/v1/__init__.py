"""featureviz.v1: the versioned gRPC contract (featureviz.proto) and its generated Python code."""
