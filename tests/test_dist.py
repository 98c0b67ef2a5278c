"""magnet.dist: a world of one from an empty environment, and rank-0 decisions reaching every rank."""

from __future__ import annotations

import os
import subprocess
import sys

from magnet import dist

RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

CHILD = """
import json, os, sys, torch
from magnet import dist
info = dist.init()
name = dist.broadcast_object(f"run-of-rank-{info.rank}")
total = dist.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
dist.barrier()
dist.shutdown()
print(json.dumps({"rank": info.rank, "world": info.world_size, "name": name, "sum": total.item(),
                  "group_left": not torch.distributed.is_initialized(),
                  "primary": dist.is_primary(), "backend": dist.backend(), "device": str(dist.device())}))
"""


def test_ensure_env_fills_a_world_of_one(monkeypatch):
    for key in RENDEZVOUS:
        monkeypatch.delenv(key, raising=False)
    info = dist.ensure_env()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    assert dist.is_primary()
    assert dist.broadcast_object({"a": 1}) == {"a": 1}  # no process group: identity


def test_ensure_env_keeps_what_a_launcher_set(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "12345")
    info = dist.ensure_env()
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1)
    assert os.environ["MASTER_PORT"] == "12345"
    assert not dist.is_primary()


def test_two_gloo_processes_share_rank0_decisions():
    import json

    port = str(dist.free_port())
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                              env={**env, "CUDA_VISIBLE_DEVICES": "", "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    out = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]  # 134: an abort in teardown (dist.shutdown prevents it)
    assert [o["name"] for o in out] == ["run-of-rank-0", "run-of-rank-0"]
    assert [o["sum"] for o in out] == [3.0, 3.0]
    assert [o["primary"] for o in out] == [True, False]
    assert all(o["group_left"] for o in out)
    assert {o["backend"] for o in out} == {"gloo"} and {o["device"] for o in out} == {"cpu"}
