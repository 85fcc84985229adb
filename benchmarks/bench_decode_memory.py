"""How much memory one image's VAE decoding holds against one UNet row, on a model of Stable Diffusion 1.5's size:
the basis of ``interp.core.diffusion.DECODE_ROWS_PER_IMAGE``.

    .venv/bin/python benchmarks/sd15_sized.py /tmp/sd15-16 --sample-size 16      # random weights, SD 1.5's VAE
    .venv/bin/python benchmarks/bench_decode_memory.py /tmp/sd15-16 [--latent 64] [--threads 2]

Each measurement runs in a fresh process: load the part, reset the memory high-water mark (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``), run one no-grad pass of n = 1 and n = ``--n`` images (VAE decoding of
``--latent`` latents) or rows (UNet at ``--latent``), and read the growth of the high-water mark. The growth from 1
to n, over n - 1, is the cost of one more image or row (a first pass also pays fixed costs); printed with the ratio. The UNet folder's ``sample_size`` does not matter: the
pass runs at ``--latent``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
part, folder, n, latent, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from diffusers import AutoencoderKL, UNet2DConditionModel
def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0]) * 1024
if part == "vae":
    m = AutoencoderKL.from_pretrained(folder + "/vae").eval()
    z = torch.randn(n, m.config.latent_channels, latent, latent)
    run = lambda: m.decode(z).sample
else:
    m = UNet2DConditionModel.from_pretrained(folder + "/unet").eval()
    x = torch.randn(n, m.config.in_channels, latent, latent)
    c = torch.randn(n, 77, m.config.cross_attention_dim)
    run = lambda: m(x, torch.full((n,), 500), encoder_hidden_states=c).sample
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = kib("VmRSS")
t0 = time.perf_counter()
with torch.no_grad():
    run()
print(json.dumps({"grown": kib("VmHWM") - base, "seconds": time.perf_counter() - t0}))
"""


def measure(part: str, folder: str, n: int, latent: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, part, folder, str(n), str(latent), str(threads)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a Stable Diffusion pipeline folder (benchmarks/sd15_sized.py writes one)")
    p.add_argument("--latent", type=int, default=64, help="latent size (default %(default)s: 512x512 pixels)")
    p.add_argument("--n", type=int, default=4, help="the larger batch (default %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be >= 2")
    per = {}
    for part, unit in (("vae", "decoded image"), ("unet", "UNet row")):
        one, big = (measure(part, args.folder, n, args.latent, args.threads) for n in (1, args.n))
        per[part] = (big["grown"] - one["grown"]) / (args.n - 1)
        print(f"{part}: high-water growth {one['grown'] / 2**30:.2f} GiB for 1, {big['grown'] / 2**30:.2f} GiB for "
              f"{args.n} ({one['seconds']:.1f} s, {big['seconds']:.1f} s): {per[part] / 2**30:.2f} GiB per {unit}")
    print(f"one decoded image holds what {per['vae'] / max(per['unet'], 1):.1f} UNet rows do "
          f"(interp.core.diffusion.DECODE_ROWS_PER_IMAGE rounds it up)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
