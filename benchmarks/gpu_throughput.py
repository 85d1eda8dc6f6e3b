"""GPU finetuning throughput: data held on the GPU vs a CPU DataLoader, and trials per hour when
several trials share one GPU.

Studies put several trials on one GPU (`resources.gpu: 0.25`); that only pays off if each trial is
not starved by its input pipeline. This measures, on one CUDA GPU, with ResNet56 at CIFAR size:

(a) images/s of finetuning steps (bf16 autocast + channels-last, `tpp.train.Precision`) fed by
    - the device-side path: uint8 images on the GPU, batched random crop + flip there (tpp.data), and
    - a standard CPU DataLoader: per-sample PIL RandomCrop(32, 4) + flip + ToTensor + Normalize in
      worker processes, pinned memory, non-blocking copies;
(b) trials per hour with 1, 2, 4, 8 concurrent trials: separate processes, each a short tpp
    finetune (prune_stage with L1 at PR 0.5, then finetune_stage), all released at once; aggregate
    throughput = trials / (last end - first start).

The images are random uint8 arrays of CIFAR-10's shape (50,000 x 3 x 32 x 32): decoding and copying
cost the same whatever the pixels are, and no data set has to be shipped to the GPU machine.
Without CUDA it prints "no CUDA GPU: unmeasured" and exits 0: CPU numbers would say nothing.
`--dry-run-cpu` runs the same code on the CPU with tiny sizes, to check the script itself works
before a GPU machine is spent on it (its numbers mean nothing).

    python -m benchmarks.gpu_throughput [--quick] [--dry-run-cpu]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import machine, parser, table

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def random_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random uint8 images [n, 3, 32, 32] and labels in [0, 10)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def cifar_like(n_train: int, n_test: int = 1000):
    """A TensorData of random uint8 CIFAR-shaped images (augmenting, CIFAR normalisation)."""
    from tpp.data import TensorData

    (x, y), (xt, yt) = random_images(n_train), random_images(n_test, seed=1)
    return TensorData("cifar-like", x, y, xt, yt, 10, mean=MEAN, std=STD, augment=True)


class PilCifar(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's way: uint8 HWC arrays -> PIL image -> per-sample transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        from torchvision import transforms

        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model(device: torch.device, precision):
    from tpp.models import ModelSpec, build_model

    torch.manual_seed(0)
    return precision.prepare_model(build_model(ModelSpec("resnet56", 10, (3, 32, 32))), device)


def _steps_per_s(batches, model, precision, device, n_steps: int, warmup: int = 5) -> float:
    """Images/s of `n_steps` SGD steps after `warmup` steps, synchronised at both ends."""
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    it = iter(batches)
    images, t0 = 0, None
    for step in range(warmup + n_steps):
        if step == warmup:
            _sync(device)
            t0, images = time.perf_counter(), 0
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = precision.prepare_input(x, device)
        with precision.autocast(device):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        images += len(y)
    _sync(device)
    return images / (time.perf_counter() - t0)


def data_paths(device: torch.device, n_steps: int, workers: tuple[int, ...],
               n_images: int = 50_000) -> list[dict[str, object]]:
    """(a): device-side data vs CPU DataLoaders, same model, optimizer and precision."""
    from tpp.train import Precision

    data = cifar_like(n_images)
    ds = PilCifar(*random_images(n_images))
    rows = []
    for bf16 in (True, False):
        precision = Precision(bf16=bf16, channels_last=bf16)
        label = "bf16 + channels-last" if bf16 else "fp32"
        gen = torch.Generator().manual_seed(0)
        ips = _steps_per_s(data.train_batches(128, gen, device), _model(device, precision), precision, device,
                           n_steps)
        rows.append({"precision": label, "data path": "device-side (tpp.data)", "images/s": ips})
        for w in workers:
            loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=w,
                                                 pin_memory=device.type == "cuda", drop_last=True,
                                                 persistent_workers=w > 0)
            ips = _steps_per_s(loader, _model(device, precision), precision, device, n_steps)
            rows.append({"precision": label, "data path": f"CPU DataLoader, {w} workers", "images/s": ips})
    dev = {r["precision"]: r["images/s"] for r in rows if r["data path"].startswith("device")}
    for r in rows:
        r["vs device-side"] = r["images/s"] / dev[r["precision"]]
    return rows


def worker(args: list[str]) -> None:
    """One trial in its own process: wait for the go file, prune (L1) and finetune, print timings."""
    from tpp.config import RunConfig
    from tpp.models import ModelSpec, build_model
    from tpp.results import DenseModel, cpu_state_dict
    from tpp.run import finetune_stage, prune_stage

    go, ready, n_train, epochs, device = Path(args[0]), Path(args[1]), int(args[2]), int(args[3]), args[4]
    data = cifar_like(n_train)
    torch.manual_seed(0)
    spec = ModelSpec("resnet56", 10, (3, 32, 32))
    dense = DenseModel(spec, cpu_state_dict(build_model(spec)))
    cfg = RunConfig(model="resnet56", data="cifar10", method="l1", pr=0.5, lr=0.01, epochs=epochs,
                    batch_size=128, device=device, bf16=True, channels_last=True, jsv_samples=8)
    torch.zeros(1, device=device)  # CUDA context before the start line
    ready.write_text("ready")
    while not go.exists():
        time.sleep(0.01)
    start = time.time()
    pruned = prune_stage(cfg, dense, data)
    finetune_stage(cfg, pruned, data)
    _sync(torch.device(device))
    print(json.dumps({"start": start, "end": time.time()}), flush=True)


def concurrent_trials(device: torch.device, counts: tuple[int, ...], n_train: int,
                      epochs: int) -> list[dict[str, object]]:
    """(b): k trial processes released together; aggregate trials per hour."""
    rows, single = [], None
    for k in counts:
        with tempfile.TemporaryDirectory(prefix="tpp-gpu-bench-") as d:
            go = Path(d) / "go"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_throughput", "--worker", str(go),
                                       str(Path(d) / f"ready{i}"), str(n_train), str(epochs), device.type],
                                      stdout=subprocess.PIPE, text=True, env=env)
                     for i in range(k)]
            while sum((Path(d) / f"ready{i}").exists() for i in range(k)) < k:
                if any(p.poll() not in (None, 0) for p in procs):
                    raise RuntimeError("a trial process failed before starting")
                time.sleep(0.05)
            go.write_text("go")
            outs = [p.communicate()[0] for p in procs]
            if any(p.returncode for p in procs):
                raise RuntimeError(f"a trial process failed: {outs}")
        spans = [json.loads(o.strip().splitlines()[-1]) for o in outs]
        wall = max(s["end"] for s in spans) - min(s["start"] for s in spans)
        per_hour = k * 3600 / wall
        single = single or per_hour
        mean = sum(s["end"] - s["start"] for s in spans) / k
        rows.append({"concurrent trials": k, "wall s": wall, "mean trial s": mean,
                     "trials/hour": per_hour, "vs 1 trial": per_hour / single,
                     "images/s (all trials)": k * epochs * n_train / wall})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dry-run-cpu", action="store_true", help="the code on the CPU, tiny sizes (a test)")
    args = p.parse_args()
    if args.dry_run_cpu:
        device = torch.device("cpu")
        rows_a = data_paths(device, n_steps=2, workers=(0,), n_images=1024)
        rows_b = concurrent_trials(device, (1, 2), n_train=256, epochs=1)
    elif not torch.cuda.is_available():
        print("no CUDA GPU: unmeasured")
        print(table([{"item": "gpu_throughput", "result": "unmeasured (no CUDA GPU)"}]))
        print(f"\nmachine: {machine()}")
        return
    elif args.quick:
        device = torch.device("cuda")
        rows_a = data_paths(device, n_steps=20, workers=(2,))
        rows_b = concurrent_trials(device, (1, 2), n_train=2048, epochs=1)
    else:
        device = torch.device("cuda")
        cpus = os.cpu_count() or 2
        rows_a = data_paths(device, n_steps=200, workers=(0, 2, max(2, min(8, cpus // 2))))
        rows_b = concurrent_trials(device, (1, 2, 4, 8), n_train=10_000, epochs=3)
    print(table(rows_a))
    print()
    print(table(rows_b))
    print(f"\nmachine: {machine()}" + ("  (CPU dry run: numbers mean nothing)" if args.dry_run_cpu else ""))


if __name__ == "__main__":
    main()
