"""Cost of torch.use_deterministic_algorithms on the CPU training steps mindvis runs, one thread.

Usage: ``python benchmarks/deterministic_kernels.py on|off`` (run both; results in results/decode.md).
"""
import sys, time
import torch
torch.set_num_threads(1)
from mindvis.config import fill_defaults, load_schema
from mindvis.models.ldm import build_embedded_generator
from mindvis.models.mbm import MBMAutoencoder
flag = sys.argv[1] == "on"
torch.use_deterministic_algorithms(flag, warn_only=True)
torch.manual_seed(0)
ldm = fill_defaults({"base": "embedded"}, load_schema()["properties"]["ldm"])
gen = build_embedded_generator(32, 1, 10, ldm)
params = list(gen.vae.parameters()) + list(gen.unet.parameters()) + list(gen.class_conditioner.parameters())
opt = torch.optim.AdamW(params, 1e-4)
x = torch.randn(64, 1, 32, 32)
def vae_step():
    post = gen.vae.encode(x).latent_dist
    loss = ((gen.vae.decode(post.sample()).sample - x) ** 2).mean(); loss.backward(); opt.step(); opt.zero_grad()
def unet_step():
    lat = torch.randn(64, 4, 8, 8); c = gen.class_conditioner(torch.randint(0, 10, (64,)))
    out = gen.unet(lat, torch.randint(0, 1000, (64,)), encoder_hidden_states=c.context, class_labels=c.pooled).sample
    (out ** 2).mean().backward(); opt.step(); opt.zero_grad()
mbm = MBMAutoencoder.from_preset("tiny", n_voxels=4500, patch_size=16)
opt2 = torch.optim.AdamW(mbm.parameters(), 1e-4)
f = torch.randn(32, 4500)
def mbm_step():
    loss = mbm(f)[0]; loss.backward(); opt2.step(); opt2.zero_grad()
for name, step, n in (("vae", vae_step, 15), ("unet", unet_step, 30), ("mbm", mbm_step, 30)):
    step(); t = time.perf_counter()
    for _ in range(n): step()
    print(f"{name} {'deterministic' if flag else 'default'}: {(time.perf_counter() - t) / n * 1000:.0f} ms/step")
