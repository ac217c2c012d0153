"""lecture_flash.MultiHeadAttention as the README tells a lecture user to use it: in a script named
gpt.py, run from its own folder, as the lecture's is."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from lecture_flash.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
IMPORT = "from lecture_flash import MultiHeadAttention"
SA_LINE = "self.sa = MultiHeadAttention(n_head, head_size, n_embd=n_embd, dropout=dropout)"

# The lecture's final gpt.py, shrunk (sizes, steps, a generated text), with the README's two edits:
# its Head and MultiHeadAttention classes deleted, ours imported, the Block's line passing dropout.
LECTURE_SCRIPT = f'''
import torch
import torch.nn as nn
from torch.nn import functional as F
{IMPORT}

batch_size, block_size, max_iters, learning_rate = 8, 16, 30, 3e-3
n_embd, n_head, n_layer, dropout = 32, 4, 2, 0.2
torch.manual_seed(1337)
text = "".join(chr(97 + (i * 7 + i // 13) % 26) + (" " if i % 5 == 4 else "") for i in range(4000))
chars = sorted(list(set(text)))
vocab_size = len(chars)
stoi = {{ch: i for i, ch in enumerate(chars)}}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)

def get_batch():
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([data[i:i + block_size] for i in ix])
    y = torch.stack([data[i + 1:i + block_size + 1] for i in ix])
    return x, y

class FeedFoward(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)

class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        head_size = n_embd // n_head
        {SA_LINE}
        self.ffwd = FeedFoward(n_embd)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x

class GPTLanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head=n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

model = GPTLanguageModel()
assert model.blocks[0].sa.attn_dropout == dropout  # the global reached the attention
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
losses = []
for it in range(max_iters):
    xb, yb = get_batch()
    _, loss = model(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"first loss {{losses[0]:.3f}}, last loss {{losses[-1]:.3f}}, vocab {{vocab_size}}")
torch.save(model.state_dict(), "lecture.pt")
'''


def test_the_readme_recipe_runs_in_a_script_named_gpt_py(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert IMPORT in readme and SA_LINE in readme  # the test runs what the README shows
    (tmp_path / "gpt.py").write_text(LECTURE_SCRIPT)
    env = {**os.environ}  # the installed lecture_flash, gpt.py from the script's folder
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "gpt.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    first, last = (float(w) for w in r.stdout.replace(",", "").split() if w[0].isdigit() and "." in w)
    assert last < first, r.stdout
    # The script's checkpoint loads, strict, into this project's GPT.
    vocab = int(r.stdout.split()[-1])
    ours = GPT(GPTConfig(vocab_size=vocab, block_size=16, n_embd=32, n_head=4, n_layer=2))
    ours.load_state_dict(torch.load(tmp_path / "lecture.pt", weights_only=True))


def test_gpt_reexports_the_kernels_module():
    import lecture_flash
    import lecture_flash.gpt
    assert lecture_flash.gpt.MultiHeadAttention is lecture_flash.MultiHeadAttention
