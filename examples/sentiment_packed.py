"""Sequence classifier over variable-length packed sequences with a bidirectional GRU.

Generated data with a learnable rule: each "review" is a sequence of 4..40 word ids; word 1 means "good", word 2
"bad", the rest are neutral. The label is 1 when the review has more "good" than "bad" words. Sequences are padded,
then packed with their lengths (pack_padded_sequence, unsorted), so the GRU never reads the padding.

The one-line swap: `rnn=fusedrnn.GRU` (was `nn.GRU`); the packing code is unchanged.

    python examples/sentiment_packed.py           # ~30 s on a laptop CPU
    python examples/sentiment_packed.py --quick
"""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from _common import banner, parse_args, report_loss, speedup

VOCAB, GOOD, BAD = 24, 1, 2


def make_data(n: int, gen: torch.Generator, max_len: int = 40):
    """-> tokens [n, max_len] (0 = padding), lengths [n], labels [n]; balanced, ties broken by the last mention."""
    lengths = torch.randint(4, max_len + 1, (n,), generator=gen)
    tokens = torch.randint(3, VOCAB, (n, max_len), generator=gen)
    sentiment = torch.rand(n, max_len, generator=gen)
    tokens[sentiment < 0.12] = GOOD
    tokens[(sentiment >= 0.12) & (sentiment < 0.24)] = BAD
    pos = torch.arange(max_len)[None, :]
    tokens[pos >= lengths[:, None]] = 0
    good, bad = (tokens == GOOD).sum(1), (tokens == BAD).sum(1)
    last_good = torch.where(tokens == GOOD, pos, -1).max(1).values
    last_bad = torch.where(tokens == BAD, pos, -1).max(1).values
    labels = ((good > bad) | ((good == bad) & (last_good > last_bad))).long()
    return tokens, lengths, labels


class Classifier(nn.Module):
    def __init__(self, emb: int = 32, hidden: int = 64, rnn=fusedrnn.GRU, backend="auto"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, emb, padding_idx=0)
        self.rnn = rnn(emb, hidden, batch_first=True, bidirectional=True, backend=backend)  # was nn.GRU(...)
        self.head = nn.Linear(2 * hidden, 2)

    def forward(self, tokens, lengths):
        """tokens [B, T], lengths [B] (CPU int64) -> logits [B, 2]."""
        packed = pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)                     # h [2, B, hidden], in the caller's batch order
        return self.head(torch.cat([h[0], h[1]], dim=1))


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    banner("sentiment_packed", args.backend, args.device)
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.steps or (20 if args.quick else 120)
    B = 64
    test_x, test_len, test_y = make_data(512, gen)
    model = Classifier(backend=args.backend).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    loss_fn = nn.CrossEntropyLoss()

    @torch.no_grad()
    def accuracy():
        model.eval()
        pred = model(test_x.to(args.device), test_len).argmax(1).cpu()
        model.train()
        return (pred == test_y).float().mean().item()

    print(f"test accuracy before training: {accuracy():.3f}")
    losses = []
    for step in range(steps):
        x, lengths, y = make_data(B, gen)
        loss = loss_fn(model(x.to(args.device), lengths), y.to(args.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    k = max(1, min(10, steps // 4))
    report_loss(sum(losses[:k]) / k, sum(losses[-k:]) / k)
    print(f"test accuracy after training: {accuracy():.3f}")

    x, lengths, y = make_data(B, gen)
    x, y = x.to(args.device), y.to(args.device)

    def train_step(m):
        m.zero_grad()
        loss_fn(m(x, lengths), y).backward()
    print(speedup(model, train_step, args.device, reps=3 if args.quick else 5))


if __name__ == "__main__":
    main()
