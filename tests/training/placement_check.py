"""Run by test_placement.py in a fresh interpreter: a ``ray.cluster_utils.Cluster`` with a CPU-less head and two
nodes of 2 CPUs each; one short 2-worker distillation per placement strategy; prints one JSON line
``PLACEMENT {"nodes": [...], "runs": {strategy: [node id of rank 0, of rank 1]}}`` read from the workers' own
metrics log (each worker records ``ray.get_runtime_context().get_node_id()``). The test process's Ray is never
touched, and the cluster is torn down before exiting.

    python tests/training/placement_check.py OUT_DIR STRATEGY [STRATEGY ...]
"""

from __future__ import annotations

import json
import os
import sys


def main(out_dir: str, strategies: list[str]) -> int:
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")
    import ray
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from slimray.families.classifier.datasets import load_digits
    from slimray.runtime import FAIL_FAST_ENV
    from slimray.training.classifier_data import TrainData, classifier_job
    from slimray.training.distill import run_training

    for key, value in FAIL_FAST_ENV.items():
        os.environ.setdefault(key, value)
    # Cluster() records its address in Ray's shared temp folder; put back whatever was there once it is gone
    address_file = get_ray_address_file(None)
    previous = open(address_file).read() if os.path.exists(address_file) else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    result: dict = {"runs": {}}
    try:
        nodes = [cluster.add_node(num_cpus=2, object_store_memory=80 * 2**20) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in FAIL_FAST_ENV}})
        result["nodes"] = [n.node_id for n in nodes]
        ds = load_digits(seed=0)
        (x, y), (xv, yv) = ds.normalized("train"), ds.normalized("val")
        data = TrainData(ray.put(x[:256].numpy()), ray.put(y[:256].numpy()), ray.put(xv.numpy()), ray.put(yv.numpy()))
        spec = {"kind": "cnn", "in_channels": 1, "image_size": 8, "conv_channels": [4, 8], "fc_hidden": [], "num_classes": 10}
        for strategy in strategies:
            metrics = os.path.join(out_dir, f"{strategy}.jsonl")
            job = classifier_job(label=strategy, run_name=f"place-{strategy}", storage_path=os.path.join(out_dir, "ray"), spec=spec,
                           epochs=1, batch_size=64, lr=3e-3, num_workers=2, max_failures=0, placement_strategy=strategy,
                           metrics_path=metrics)
            run_training(job, data)
            with open(metrics) as f:
                result["runs"][strategy] = json.loads(f.read().splitlines()[-1])["worker_nodes"]
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is not None:
            with open(address_file, "w") as f:
                f.write(previous)
        elif os.path.exists(address_file):
            os.remove(address_file)
    print("PLACEMENT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
