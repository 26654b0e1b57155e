"""modalink services: one folder per service, each a short server.py over the modalink library."""
