"""darknet_bn's parallel calls on PyTorch's OpenMP team (darknet_bn._openmp_team, dnbn_set_team).

Importing darknet_bn.torch hands the C library the GOMP_parallel of the OpenMP
runtime PyTorch loaded. Each test runs in a fresh interpreter, so that whether
the team is in use does not depend on what other tests imported.
"""
import json

import pytest

from _reliability import describe_exit, run_python

pytest.importorskip("torch")

# One training step and an inference forward at 2 threads on a tensor of 2^18 values (two threads' worth at
# the fixed threshold below); prints a digest of every output, the team, and the threads the process had
# before and after the calls (a call on the pool starts a darknet_bn worker; on the team, none).
STEP = """
import hashlib, json, os, numpy as np
{imports}
import darknet_bn
darknet_bn.set_num_threads(2)
torch.set_num_threads(2)
torch.ones(64, 64) @ torch.ones(64, 64)  # PyTorch's own parallel work first: its OpenMP team exists
def threads():
    return len(os.listdir("/proc/self/task"))
def step():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 16, 64, 64), dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal((4, 16, 64, 64), dtype=np.float32)
    layer = darknet_bn.BatchNormLayer(4, 64, 64, 16, numerics="standard")
    h = hashlib.sha256()
    h.update(layer.forward(x).tobytes())
    h.update(layer.backward(dy).tobytes())
    h.update(layer.scale_updates.tobytes() + layer.bias_updates.tobytes())
    h.update(layer.forward(x, train=False).tobytes())
    return h.hexdigest()
before = threads()
digest = step()
print(json.dumps({{"digest": digest, "team": darknet_bn.info()["team"],
                  "tuning_team": darknet_bn.info()["tuning"]["team"], "before": before, "after": threads()}}))
"""


def _step(imports, **env):
    env.setdefault("DARKNET_BN_TEAM", None)  # the suite's default (conftest) is the pool
    p = run_python(STEP.format(imports=imports), DARKNET_BN_MIN_WORK="65536", **env)
    assert p.returncode == 0, describe_exit(p)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_torch_import_runs_calls_on_pytorchs_team_with_the_pools_results():
    on_team = _step("import torch, darknet_bn.torch")
    assert "omp" in on_team["team"] and on_team["team"].startswith("/"), on_team
    assert on_team["tuning_team"] == "external"
    assert on_team["after"] == on_team["before"], "a call on the team started a thread of darknet_bn's own"
    on_pool = _step("import torch, darknet_bn.torch", DARKNET_BN_TEAM="pool")
    assert on_pool["team"] == "pool" and on_pool["tuning_team"] == "pool"
    assert on_pool["after"] == on_pool["before"] + 1, "the pool's worker (2 threads: one) was not started"
    without_module = _step("import torch")
    assert without_module["team"] == "pool", "the team is taken only by darknet_bn.torch"
    assert on_team["digest"] == on_pool["digest"] == without_module["digest"]


def test_forked_child_uses_the_pool():
    code = STEP.format(imports="import torch, darknet_bn.torch") + """
pid = os.fork()
if pid == 0:
    ok = darknet_bn.info()["team"] == "pool" and step() == digest
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), darknet_bn.info()["team"] != "pool")
"""
    p = run_python(code, DARKNET_BN_MIN_WORK="65536", DARKNET_BN_TEAM=None)
    assert p.returncode == 0, describe_exit(p)
    assert p.stdout.strip().splitlines()[-1] == "child 0 True", p.stdout


def test_calls_from_several_threads_at_once_on_the_team():
    code = STEP.format(imports="import torch, darknet_bn.torch") + """
import threading
results, errors = [], []
def work():
    try:
        for _ in range(5):
            results.append(step())
    except BaseException as exc:  # reported below
        errors.append(repr(exc))
workers = [threading.Thread(target=work) for _ in range(4)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps({"errors": errors, "same": sorted(set(results)) == [digest], "n": len(results)}))
"""
    p = run_python(code, DARKNET_BN_MIN_WORK="65536", DARKNET_BN_TEAM=None)
    assert p.returncode == 0, describe_exit(p)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert report == {"errors": [], "same": True, "n": 20}


# A forked child must never run a libgomp team when its parent's thread had one: it would wait forever for
# threads that exist only in the parent. The parent here runs PyTorch's own 2-thread work first.
FORK_CHILD = """
import os, numpy as np, torch
{parent}
torch.set_num_threads(2)
x = torch.randn(600, 600); (x @ x).sum()  # the parent's main thread now has a 2-thread libgomp team
pid = os.fork()
if pid == 0:
    {child}
    import darknet_bn, darknet_bn.torch as dbt
    darknet_bn.set_num_threads(2)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((8, 16, 64, 64), dtype=np.float32))
    y = dbt.BatchNorm2d(16)(x).detach().numpy()  # 2 threads' worth at DARKNET_BN_MIN_WORK
    # (no PyTorch op of 2 threads here: libgomp would wait for the parent's threads in it too)
    ok = darknet_bn.info()["team"] == "pool" and abs(float(y.std()) - 1) < 1e-2
    os._exit(0 if ok else 3)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


@pytest.mark.parametrize("parent, child", [
    ("", "torch.set_num_threads(1)  # what a DataLoader worker does, then imports darknet_bn.torch lazily"),
    ("import darknet_bn", "pass  # PyTorch still at 2 threads; darknet_bn was imported before the fork"),
], ids=["dataloader-worker", "child-of-darknet_bn-process"])
def test_forked_child_does_not_take_the_team(parent, child):
    p = run_python(FORK_CHILD.format(parent=parent, child=child), timeout=60, DARKNET_BN_MIN_WORK="65536",
                   DARKNET_BN_TEAM=None)
    assert p.returncode == 0, describe_exit(p)
    assert p.stdout.strip().splitlines()[-1] == "child 0", p.stdout
