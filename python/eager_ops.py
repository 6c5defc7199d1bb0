"""Per-op PyTorch eager cost at the zoo's shapes, the twin of
examples/eager_ops.rs (same ops, same order): 25th-percentile microseconds (robust to a loaded machine) per call,
no_grad, eval. usage: python eager_ops.py [--threads N] [FILTER]"""
import sys, time
import torch
import torch.nn.functional as F

def us(f):
    t0 = time.perf_counter(); n = 0
    while n < 20 or time.perf_counter() - t0 < 0.05:
        f(); n += 1
    t = []; t0 = time.perf_counter()
    while len(t) < 30 or time.perf_counter() - t0 < 0.3:
        s = time.perf_counter(); f(); t.append((time.perf_counter() - s) * 1e6)
    t.sort(); return t[len(t) // 4]

args = sys.argv[1:]
filt = ""
i = 0
while i < len(args):
    if args[i] == "--threads":
        torch.set_num_threads(int(args[i + 1])); i += 2
    else:
        filt = args[i]; i += 1
r = lambda *s: torch.randn(*s)
lin = lambda i, o: (r(o, i), r(o))
x = r(64, 784); w1, b1 = lin(784, 256); h = r(64, 256); w2, b2 = lin(256, 10)
p = r(64, 1024); s = r(1024); xt = r(2, 16, 256); ln = torch.nn.LayerNorm(256)
wq, bq = lin(256, 768); qkv = r(2, 16, 768).view(2, 16, 3, 4, 64).permute(2, 0, 3, 1, 4)
att = r(2, 4, 16, 16); wm, bm = lin(256, 1024); hm = r(2, 16, 1024); wp, bp = lin(1024, 256)
xl = r(8, 128, 256); qkvl = r(8, 128, 768).view(8, 128, 3, 4, 64).permute(2, 0, 3, 1, 4)
attl = r(8, 4, 128, 128); hml = r(8, 128, 1024); yl = r(8, 4, 128, 64)
xd = r(8192, 20); wd1, bd1 = lin(20, 50); hd = r(8192, 50); bn = torch.nn.BatchNorm1d(50).eval()
wd2, bd2 = lin(50, 2); wc2, bc2 = lin(50, 4); v50 = r(50)
xc = r(1024, 3, 10, 10); c1 = torch.nn.Conv2d(3, 16, 3); hc1 = r(1024, 16, 8, 8); c2 = torch.nn.Conv2d(16, 32, 3)
hc2 = r(1024, 1152); wf, bf = lin(1152, 10); hc3 = r(1024, 32, 6, 6)
wq2, bq2 = lin(256, 768); w256, b256 = lin(256, 256); y4 = r(8192, 4); y4b = r(8192, 4); yt = r(2, 4, 16, 64)
ops = [
    ("sn linear 64x784->256", lambda: F.linear(x, w1, b1)),
    ("sn relu 64x256", lambda: h.relu()),
    ("sn linear 64x256->10", lambda: F.linear(h, w2, b2)),
    ("pc mul [64,1024]*[1024]", lambda: p * s),
    ("pc add [64,1024]+[64,1024]", lambda: p + p),
    ("pc gelu 64x1024", lambda: F.gelu(p)),
    ("pc sigmoid 64x1024", lambda: p.sigmoid()),
    ("pc tanh 64x1024", lambda: p.tanh()),
    ("pc exp 64x1024", lambda: p.exp()),
    ("pc abs 64x1024", lambda: p.abs()),
    ("pc mul_scalar 64x1024", lambda: p * 0.5),
    ("pc relu 64x1024", lambda: p.relu()),
    ("pc sqrt 64x1024", lambda: p.sqrt()),
    ("tb layer_norm 2x16x256", lambda: ln(xt)),
    ("tb linear 32x256->768", lambda: F.linear(xt, wq, bq)),
    ("tb q@kT 2x4x16x64", lambda: qkv[0] @ qkv[1].transpose(-2, -1)),
    ("tb softmax 2x4x16x16", lambda: att.softmax(-1)),
    ("tb att@v", lambda: att @ qkv[2]),
    ("tb transpose+reshape 2x4x16x64", lambda: yt.transpose(1, 2).reshape(2, 16, 256)),
    ("tb add 2x16x256", lambda: xt + xt),
    ("tb linear 32x256->1024", lambda: F.linear(xt, wm, bm)),
    ("tb gelu 2x16x1024", lambda: F.gelu(hm)),
    ("tb linear 32x1024->256", lambda: F.linear(hm, wp, bp)),
    ("TB layer_norm 8x128x256", lambda: ln(xl)),
    ("TB linear 1024x256->768", lambda: F.linear(xl, wq2, bq2)),
    ("TB q@kT 8x4x128x64", lambda: qkvl[0] @ qkvl[1].transpose(-2, -1)),
    ("TB mul_scalar 8x4x128x128", lambda: attl * 0.125),
    ("TB softmax 8x4x128x128", lambda: attl.softmax(-1)),
    ("TB att@v", lambda: attl @ qkvl[2]),
    ("TB transpose+reshape", lambda: yl.transpose(1, 2).reshape(8, 128, 256)),
    ("TB linear 1024x256->256", lambda: F.linear(xl, w256, b256)),
    ("TB add 8x128x256", lambda: xl + xl),
    ("TB linear 1024x256->1024", lambda: F.linear(xl, wm, bm)),
    ("TB gelu 8x128x1024", lambda: F.gelu(hml)),
    ("TB linear 1024x1024->256", lambda: F.linear(hml, wp, bp)),
    ("nd linear 8192x20->50", lambda: F.linear(xd, wd1, bd1)),
    ("nd batchnorm1d eval 8192x50", lambda: bn(hd)),
    ("nd relu 8192x50", lambda: hd.relu()),
    ("nd linear 8192x50->2", lambda: F.linear(hd, wd2, bd2)),
    ("cs matmul 8192x20 @ w.t()", lambda: xd @ wd1.t()),
    ("cs add [8192,50]+[50]", lambda: hd + v50),
    ("cs sub [8192,50]-[50]", lambda: hd - v50),
    ("cs div [8192,50]/[50]", lambda: hd / v50),
    ("cs mul [50]*[8192,50]", lambda: v50 * hd),
    ("cs leaky_relu 8192x50", lambda: F.leaky_relu(hd, 0.01)),
    ("cs matmul 8192x50 @ w.t() (4)", lambda: hd @ wc2.t()),
    ("cs add [8192,4]+[4]", lambda: y4 + bc2),
    ("cs sigmoid 8192x4", lambda: y4b.sigmoid()),
    ("cn conv 3->16 1024x3x10x10", lambda: c1(xc)),
    ("cn relu 1024x16x8x8", lambda: hc1.relu()),
    ("cn conv 16->32", lambda: c2(hc1)),
    ("cn relu 1024x32x6x6", lambda: hc3.relu()),
    ("cn linear 1024x1152->10", lambda: F.linear(hc2, wf, bf)),
]
with torch.no_grad():
    for name, f in ops:
        if filt in name:
            print(f"| {name} | {us(f):.2f} |", flush=True)
