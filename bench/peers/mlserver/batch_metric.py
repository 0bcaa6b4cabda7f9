"""The batch-size histogram of the MLServer peer, in its own module: MLServer imports runtime.py more than once,
and a histogram defined there would be registered twice."""

from prometheus_client import Histogram

# In process (parallel_workers: 0) MLServer's /metrics shows prometheus_client's default registry, not the one
# mlserver.register()/mlserver.log() write to, so the histogram goes to the default registry directly.
BATCH_IMAGES = Histogram("fmnist_batch_images", "Images per predict call (the batch MLServer formed)",
                         buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256])
