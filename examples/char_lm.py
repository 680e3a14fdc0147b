"""Character-level language model on a small bundled text, then sampling one character at a time with the LSTM
state carried from step to step.

The one-line swap: the model below is a plain torch.nn model except `rnn=fusedrnn.LSTM` (was `nn.LSTM`).

    python examples/char_lm.py            # ~30 s on a laptop CPU
    python examples/char_lm.py --quick    # a few steps, a few seconds
"""
import torch
from torch import nn

import fusedrnn
from _common import banner, parse_args, report_loss, speedup

# Written for this example; public domain.
TEXT = (
    "The river rises in the hills and runs to the sea. In spring the river is high and fast, and the mill by the "
    "bridge turns all day. In summer the river is low and slow, and the children walk across it on the stones. "
    "In autumn the leaves fall on the river and ride it down to the sea. In winter the river is cold and quiet, "
    "and the mill by the bridge is still. The miller says the river is the same river every year, and the "
    "children say it is a new river every day. The sea says nothing, and takes the river all the same. "
)


class CharLM(nn.Module):
    def __init__(self, vocab: int, emb: int = 32, hidden: int = 128, rnn=fusedrnn.LSTM, backend="auto"):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = rnn(emb, hidden, batch_first=True, backend=backend)   # torch.nn: nn.LSTM(emb, hidden, ...)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, idx, state=None):
        """idx [B, T] -> logits [B, T, V], (h, c) each [1, B, hidden]."""
        y, state = self.rnn(self.emb(idx), state)
        return self.out(y), state


@torch.no_grad()
def sample(model, stoi, itos, prompt: str, n: int, device, temperature: float = 0.7) -> str:
    """Feeds the prompt, then one character at a time, carrying (h, c) between calls."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    logits, state = model(torch.tensor([[stoi[c] for c in prompt]], device=device))
    out = prompt
    for _ in range(n):
        p = torch.softmax(logits[0, -1].float().cpu() / temperature, dim=-1)
        nxt = int(torch.multinomial(p, 1, generator=g))
        out += itos[nxt]
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    model.train()
    return out


def main():
    args = parse_args(__doc__.splitlines()[0])
    torch.manual_seed(args.seed)
    banner("char_lm", args.backend, args.device)
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = dict(enumerate(chars))
    data = torch.tensor([stoi[c] for c in TEXT], device=args.device)
    T, B = 48, 32
    steps = args.steps or (25 if args.quick else 200)
    model = CharLM(len(chars), backend=args.backend).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.CrossEntropyLoss()

    def batch():
        start = torch.randint(0, len(data) - T - 1, (B,))
        idx = start[:, None] + torch.arange(T + 1)
        chunk = data[idx.to(args.device)]
        return chunk[:, :-1], chunk[:, 1:]

    losses = []
    for step in range(steps):
        x, y = batch()
        logits, _ = model(x)
        loss = loss_fn(logits.reshape(-1, len(chars)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    k = max(1, min(5, steps // 5))
    report_loss(sum(losses[:k]) / k, sum(losses[-k:]) / k)
    print("sample:", repr(sample(model, stoi, itos, "The river ", 60 if args.quick else 200, args.device)))

    x, y = batch()

    def train_step(m):
        logits, _ = m(x)
        m.zero_grad()
        loss_fn(logits.reshape(-1, len(chars)), y.reshape(-1)).backward()
    print(speedup(model, train_step, args.device, reps=3 if args.quick else 5))


if __name__ == "__main__":
    main()
