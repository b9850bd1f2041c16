"""Generated protobuf modules; sources are the .proto files beside them."""
