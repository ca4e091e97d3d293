"""The descriptor pool of edged's gRPC stubs, not protobuf's default one."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
