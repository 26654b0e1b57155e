"""Generated gRPC stubs of ``modalink.v1`` (common, assistant), written here by the build from the protos
(``build_stubs.py``; never committed). They register the same proto files as the main package's
``modalink.v1`` stubs, so both may be imported by one process and share their message classes."""
