"""The gRPC edge shared by every service: conversions, status mapping, server set-up, settings.

Only edge code imports this package; the core (speculum/, the models, the loop) never sees grpc.
"""
