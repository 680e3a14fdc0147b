"""Encoder-decoder that reverses digit strings: "20417" -> "71402".

The encoder is an LSTM over the digits; its final (h, c) starts a decoder LSTMCell that emits one digit per step,
fed the previous target digit while training (teacher forcing) and its own previous output when decoding.

The one-line swaps: `enc=fusedrnn.LSTM, dec=fusedrnn.LSTMCell` (were `nn.LSTM`, `nn.LSTMCell`).

    python examples/seq2seq_reverse.py            # ~40 s on a laptop CPU
    python examples/seq2seq_reverse.py --quick
"""
import torch
from torch import nn

import fusedrnn
from _common import banner, parse_args, report_loss, speedup

DIGITS, BOS = 10, 10  # tokens 0..9, then the start-of-output token


class Reverser(nn.Module):
    def __init__(self, hidden: int = 128, emb: int = 16, enc=fusedrnn.LSTM, dec=fusedrnn.LSTMCell, backend="auto"):
        super().__init__()
        self.emb = nn.Embedding(DIGITS + 1, emb)
        self.encoder = enc(emb, hidden, batch_first=True, backend=backend)     # was nn.LSTM(...)
        self.decoder = dec(emb, hidden, backend=backend)                       # was nn.LSTMCell(...)
        self.out = nn.Linear(hidden, DIGITS)

    def forward(self, src, tgt=None, length=None):
        """src [B, L] digits; tgt [B, L] for teacher forcing, or None to decode greedily -> logits [B, L, 10]."""
        _, (h, c) = self.encoder(self.emb(src))
        h, c = h[0], c[0]
        prev = torch.full((src.shape[0],), BOS, dtype=torch.long, device=src.device)
        logits = []
        for t in range(src.shape[1] if length is None else length):
            h, c = self.decoder(self.emb(prev), (h, c))
            step = self.out(h)
            logits.append(step)
            prev = tgt[:, t] if tgt is not None else step.argmax(1)
        return torch.stack(logits, 1)


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    banner("seq2seq_reverse", args.backend, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    L, B = 6, 64
    steps = args.steps or (25 if args.quick else 300)

    def batch(n):
        src = torch.randint(0, DIGITS, (n, L), generator=gen)
        return src.to(args.device), src.flip(1).to(args.device)

    model = Reverser(backend=args.backend).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()
    test_src, test_tgt = batch(256)

    @torch.no_grad()
    def accuracy():
        model.eval()
        pred = model(test_src).argmax(-1)
        model.train()
        return (pred == test_tgt).float().mean().item(), (pred == test_tgt).all(1).float().mean().item()

    losses = []
    for step in range(steps):
        src, tgt = batch(B)
        logits = model(src, tgt)
        loss = loss_fn(logits.reshape(-1, DIGITS), tgt.reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    k = max(1, min(10, steps // 5))
    report_loss(sum(losses[:k]) / k, sum(losses[-k:]) / k)
    digit_acc, seq_acc = accuracy()
    print(f"greedy decoding on 256 new strings: digit accuracy {digit_acc:.3f}, whole-string accuracy {seq_acc:.3f}")
    src = test_src[:3]
    pred = model(src).argmax(-1)
    for s, p in zip(src.tolist(), pred.tolist()):
        print(f"  {''.join(map(str, s))} -> {''.join(map(str, p))}")

    src, tgt = batch(B)

    def train_step(m):
        m.zero_grad()
        loss_fn(m(src, tgt).reshape(-1, DIGITS), tgt.reshape(-1)).backward()
    print(speedup(model, train_step, args.device, reps=3 if args.quick else 5))


if __name__ == "__main__":
    main()
