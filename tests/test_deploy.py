"""The deployment recipes in deploy/: each parses, and the command it would run is a valid torchrun
command whose training arguments load into a TrainConfig (so a typo in a recipe fails here, not on
a cluster). The SLURM script is run for real by bash in its dry-run mode with a fake allocation."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from torch.distributed.run import get_args_parser

from signscale import config
from signscale.training.train import TrainConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OBJECT_STORE_ENV = {"AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def split_torchrun(argv: list[str]) -> tuple[object, TrainConfig]:
    """Parse ``torchrun ... -m signscale train --k=v ...`` with torchrun's own parser and signscale's config."""
    assert argv[0] == "torchrun", argv
    args = get_args_parser().parse_args(argv[1:])
    assert args.module and args.training_script == "signscale", (args.module, args.training_script)
    assert args.training_script_args[0] == "train"
    cfg = config.load(TrainConfig, None, args.training_script_args[1:])
    return args, cfg


def check_launch(args, cfg: TrainConfig, nnodes: int, nproc: int) -> None:
    assert args.rdzv_backend == "c10d" and args.nnodes == str(nnodes) and args.nproc_per_node == str(nproc)
    assert ":" in args.rdzv_endpoint and args.max_restarts >= 1
    assert cfg.resume == "auto"  # restarts and requeues continue from the bucket
    assert all(u.startswith("s3://") for u in (*cfg.data, cfg.val, cfg.out))
    assert cfg.precision == "bf16" and cfg.checkpoint_every > 0


def test_slurm_script_renders_one_torchrun_agent_per_node():
    script = DEPLOY / "slurm" / "train.sbatch"
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    assert subprocess.run([bash, "-n", str(script)], check=False).returncode == 0  # syntax
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), flags=re.MULTILINE))
    assert directives["ntasks-per-node"] == "1" and "requeue" in script.read_text()
    env = {"PATH": os.environ["PATH"], "SIGNSCALE_DRY_RUN": "1", "HEAD_NODE": "gpu-node-001", "SLURM_NNODES": "4",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8", "DATA": "s3://b/signs-50m", "RUN": "s3://b/runs/x",
           "S3_ENDPOINT_URL": "http://minio:9000"}
    proc = subprocess.run([bash, str(script)], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[0] == "srun" and "--ntasks-per-node=1" in argv
    args, cfg = split_torchrun(argv[argv.index("torchrun"):])
    check_launch(args, cfg, nnodes=4, nproc=8)
    assert args.rdzv_endpoint == "gpu-node-001:29500" and args.rdzv_id == "4242"
    assert cfg.data == ("s3://b/signs-50m",) and cfg.out == "s3://b/runs/x"
    # the object store settings are exported for the job step
    text = script.read_text()
    assert "export AWS_ENDPOINT_URL" in text and "export AWS_REGION" in text


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args from the container's environment."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


def _containers(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [c for spec in doc["spec"]["pytorchReplicaSpecs"].values()
                for c in spec["template"]["spec"]["containers"]]
    if doc["kind"] == "Job":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


@pytest.mark.parametrize("name,operator_env", [
    ("pytorchjob.yaml", {"MASTER_ADDR": "signscale-train-master-0", "MASTER_PORT": "23456"}),
    ("indexed-job.yaml", {"JOB_COMPLETION_INDEX": "3"}),
])
def test_kubernetes_manifests_render_a_valid_launch(name, operator_env):
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    jobs = [d for d in docs if _containers(d)]
    assert jobs, f"{name}: no PyTorchJob or Job in the file"
    for job in jobs:
        for c in _containers(job):
            env = {e["name"]: e.get("value", f"<from {next(iter(e.get('valueFrom', {'?': 0})))}>") for e in c["env"]}
            assert OBJECT_STORE_ENV <= set(env), f"{name}: missing {OBJECT_STORE_ENV - set(env)}"
            assert "secretKeyRef" in str([e for e in c["env"] if e["name"] == "AWS_SECRET_ACCESS_KEY"])
            argv = [_expand(a, {**env, **operator_env}) for a in (c.get("command", []) + c.get("args", []))]
            assert not [a for a in argv if "$(" in a], f"{name}: unexpanded variables in {argv}"
            args, cfg = split_torchrun(argv)
            replicas = (sum(s["replicas"] for s in job["spec"]["pytorchReplicaSpecs"].values())
                        if job["kind"] == "PyTorchJob" else job["spec"]["completions"])
            check_launch(args, cfg, nnodes=replicas, nproc=int(c["resources"]["limits"]["nvidia.com/gpu"]))
    if name == "indexed-job.yaml":
        svc = next(d for d in docs if d["kind"] == "Service")
        job = jobs[0]
        assert svc["spec"]["clusterIP"] == "None"
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
        host = args.rdzv_endpoint.split(":")[0]
        assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"  # pod 0 via the headless service
        assert args.node_rank == 3
