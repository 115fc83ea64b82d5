"""Input pipeline throughput: can the host feed the step? Prints one JSON object.

python benchmarks/data.py [--dataset mnist_10k] [--batch_size 128] [--image_size 224]
"""

import argparse
import json
import time

import jax
import numpy as np

from jaxcnn import data, train


def examples_per_second(batches, n_examples, wait=lambda batch: None):
    start = time.perf_counter()
    for batch in batches:
        wait(batch)
    return n_examples / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="mnist_10k")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    ds = data.load(args.dataset, data_dir=args.data_dir)
    load_s = time.perf_counter() - start

    split, batch = ds.train, args.batch_size
    n = data.num_train_batches(split, batch) * batch
    host = examples_per_second(data.train_batches(split, batch, seed=0, epoch=0), n)

    sharding = jax.sharding.NamedSharding(train.data_mesh(), jax.sharding.PartitionSpec("data"))
    step = jax.jit(lambda images: data.preprocess(images, args.image_size).mean())
    # Compile on a batch placed as the timed ones are: a numpy batch would compile for another sharding.
    warmup = next(data.prefetch(data.train_batches(split, batch, seed=0, epoch=0), sharding, size=1))
    step(warmup[0]).block_until_ready()
    batches = data.prefetch(data.train_batches(split, batch, seed=0, epoch=1), sharding)
    device = examples_per_second(batches, n, lambda b: step(b[0]).block_until_ready())

    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "train_examples": len(split.labels),
                "image_shape": split.images.shape[1:],
                "batch_size": batch,
                "image_size": args.image_size,
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
                "load_s": round(load_s, 3),
                "train_batches_examples_per_s": round(host),
                "prefetch_preprocess_examples_per_s": round(device),
                "numpy": np.__version__,
                "jax": jax.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
