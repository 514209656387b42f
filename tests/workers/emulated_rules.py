"""Worker: the emulated GPU (nemo_minitron/platform/emulated_gpu.py) holds CUDA's placement rules, and the
non-finite guard reads back to the host once per step. Run with NEMO_MINITRON_EMULATE_GPU=1, one process:

    python emulated_rules.py

Prints one ``ok <rule>`` line per rule and ``all <N> rules hold`` at the end; exits nonzero at the first
rule that does not hold.
"""

import io
import pickle
import sys

import torch


def expect_error(kind, fn, what):
    try:
        fn()
    except kind:
        return
    raise AssertionError(f"{what}: no {kind.__name__}")


def ours(code: str, **names):
    """Run ``code`` as if it were a line of this package (the rules for collectives and files apply there)."""
    exec(compile(code, "<nemo_minitron._probe>", "exec"), {"__name__": "nemo_minitron._probe", "torch": torch, **names})


def main():
    from nemo_minitron import parallel, platform
    from nemo_minitron.platform import emulated_gpu as eg

    parallel.initialize(1, 1)  # activates the platform (the emulated GPU) and a one-process gloo group
    assert eg.active(), "NEMO_MINITRON_EMULATE_GPU=1 is not in effect"
    dev = platform.device()
    checks = []

    def rule(name):
        def deco(fn):
            fn()
            checks.append(name)
            print(f"ok {name}", flush=True)
        return deco

    @rule("the compute device is not the host, and CUDA's device arguments lead to it")
    def _():
        assert dev.type == eg.NAME and dev != torch.device("cpu")
        for t in (torch.zeros(2, device="cuda"), torch.tensor([1, 2], device="cuda"), torch.ones(2).cuda(),
                  torch.ones(2).to("cuda:0"), torch.empty(3, device=torch.cuda.current_device())):
            assert t.device == dev, t.device
        assert torch.zeros(2).device.type == "cpu"  # a factory without a device is a host tensor, as on CUDA

    @rule("device and host tensors in one operation fail")
    def _():
        a, h = torch.ones(3, device=dev), torch.ones(3)
        expect_error(eg.DeviceMismatch, lambda: a + h, "device + host")
        expect_error(eg.DeviceMismatch, lambda: torch.cat([a, h]), "cat of both")
        expect_error(eg.DeviceMismatch, lambda: a @ torch.eye(3), "matmul with a host eye")
        expect_error(eg.DeviceMismatch, lambda: torch.ones(3, dtype=torch.bool).__setitem__(
            torch.tensor([0], device=dev), False), "host mask indexed by device indices")

    @rule("CUDA's exceptions: host scalars, host indices into a device tensor, copies")
    def _():
        a = torch.arange(4.0, device=dev)
        assert (a * torch.tensor(2.0)).device == dev
        assert a[torch.tensor([1, 3])].tolist() == [1.0, 3.0] and a[[0, 2]].tolist() == [0.0, 2.0]
        h = torch.zeros(4)
        h.copy_(a)
        assert h.tolist() == [0.0, 1.0, 2.0, 3.0]
        b = torch.zeros(4, device=dev)
        b.copy_(h)
        assert b.device == dev and b.tolist() == h.tolist()
        assert type(a.cpu()) is torch.Tensor and a.cpu().device.type == "cpu"

    @rule(".numpy() of a device tensor fails; .item() and .tolist() read back and are counted")
    def _():
        a = torch.ones(2, device=dev)
        expect_error(TypeError, lambda: a.numpy(), "numpy")
        n = eg.HOST_READS[0]
        assert a.sum().item() == 2.0 and a.tolist() == [1.0, 1.0] and float(a[0]) == 1.0
        assert eg.HOST_READS[0] - n == 3, eg.HOST_READS[0] - n

    @rule("a collective from this package refuses host tensors (NCCL's rule); device tensors reduce")
    def _():
        import torch.distributed as dist

        t = torch.ones(2, device=dev)
        ours("dist.all_reduce(t)", dist=dist, t=t)
        assert t.tolist() == [1.0, 1.0]
        expect_error(eg.DeviceMismatch, lambda: ours("dist.all_reduce(torch.ones(2))", dist=dist), "host all_reduce")
        bufs = [torch.empty(2, device=dev)]
        ours("dist.all_gather(bufs, t)", dist=dist, bufs=bufs, t=t)
        expect_error(eg.DeviceMismatch, lambda: ours("dist.all_gather([torch.empty(2)], t.cpu())", dist=dist, t=t),
                     "host all_gather")
        dist.all_reduce(torch.ones(2))  # outside this package (megatron, Lightning): not this check's business

    @rule("object collectives refuse device tensors; parallel.all_gather_tensors sends host copies")
    def _():
        import torch.distributed as dist

        t = torch.ones(2, device=dev)
        expect_error(eg.DeviceMismatch, lambda: ours("dist.all_gather_object([None], {'x': t})", dist=dist, t=t),
                     "all_gather_object of a device tensor")
        parts = parallel.all_gather_tensors({"x": t})
        assert len(parts) == 1 and parts[0]["x"].device == dev and parts[0]["x"].tolist() == [1.0, 1.0]

    @rule("files: no device tensor is written, no load without map_location")
    def _():
        t = torch.ones(2, device=dev)
        expect_error(pickle.PicklingError, lambda: torch.save(t, io.BytesIO()), "torch.save of a device tensor")
        buf = io.BytesIO()
        torch.save(t.cpu(), buf)
        expect_error(eg.DeviceMismatch, lambda: ours("buf.seek(0); torch.load(buf)", buf=buf), "load without map_location")
        ours("buf.seek(0); torch.load(buf, map_location='cpu')", buf=buf)

    @rule("the non-finite guard reads back to the host once per step")
    def _():
        from nemo_minitron.distill.train import NonFiniteGuard

        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)]).to(dev)
        model(torch.ones(2, 4, device=dev)).sum().backward()
        guard = NonFiniteGuard(limit=3)
        loss = torch.tensor(1.5, device=dev)
        for poison in (False, True):
            if poison:
                model[3].weight.grad[0, 0] = float("nan")
            n = eg.HOST_READS[0]
            skipped = guard.check(model, loss, {"kd_loss": 1.0}, step=1)
            assert eg.HOST_READS[0] - n == 1, (poison, eg.HOST_READS[0] - n)
            assert skipped == poison and guard.last == ((1, "gradient norm") if poison else None)

    print(f"all {len(checks)} rules hold", flush=True)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"rule broken: {e}", file=sys.stderr)
        raise SystemExit(1)
