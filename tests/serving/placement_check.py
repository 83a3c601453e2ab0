"""Run by test_placement.py in a fresh interpreter: a ``ray.cluster_utils.Cluster`` with a CPU-only head and three
nodes declaring one (fake) GPU each; deploys the model with the given placement options and prints one JSON line
``{"nodes": {...}, "replicas": {replica_id: node_id}}``. Never touches another Ray: the test process's own Ray
(started by the session fixture) keeps running untouched, and this cluster is torn down before exiting.

    python tests/serving/placement_check.py MODEL_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(model_dir: str) -> int:
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray import serve
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from slimray.serving.app import ServeOptions, build_app

    # Cluster() records its address in Ray's shared temp folder (ray_current_cluster), where a plain ray.init()
    # elsewhere on this machine would find it; put back whatever was there before once the cluster is gone.
    address_file = get_ray_address_file(None)
    previous = open(address_file).read() if os.path.exists(address_file) else None

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False, "object_store_memory": 80 * 2**20},
    )
    result: dict = {"nodes": {}, "deployments": {}}
    try:
        gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=80 * 2**20) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        result["nodes"] = {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}
        result["gpu_node_ids"] = [n.node_id for n in gpu_nodes]
        serve.start(proxy_location="Disabled")
        cases = {
            "whole-gpu": dict(num_replicas=3, gpus_per_replica=1),
            "half-gpu-one-per-node": dict(num_replicas=3, gpus_per_replica=0.5, max_replicas_per_node=1),
        }
        for name, placement in cases.items():
            opts = ServeOptions(model_dir=model_dir, name=name, num_cpus_per_replica=0.25, ingress="proxy", **placement)
            start = time.monotonic()
            handle = serve.run(build_app(opts), name=name, route_prefix=None)
            replicas: dict[str, dict] = {}
            for _ in range(300):  # calls are routed at random; a few dozen reach all three replicas
                info = handle.replica_info.remote().result(timeout_s=60)
                replicas[info["replica_id"]] = info
                if len(replicas) == 3:
                    break
            result["deployments"][name] = {
                "replicas": {rid: i["node_id"] for rid, i in replicas.items()},
                "devices": sorted({i["device"] for i in replicas.values()}),
                "seconds": round(time.monotonic() - start, 1),
            }
            serve.delete(name)
        serve.shutdown()
    finally:
        try:
            ray.shutdown()
        finally:
            cluster.shutdown()
            if previous is not None:
                with open(address_file, "w") as f:
                    f.write(previous)
            elif os.path.exists(address_file):
                os.remove(address_file)
    print("PLACEMENT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
