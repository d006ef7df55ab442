"""Token-level (``logits``) distillation: a frozen teacher next to the student in the shard pod.

For every micro-batch the teacher sees the same token ids as the student (they share a
tokenizer, checked at start), and the student's loss becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

summed over the predicted (label) positions and divided by the step's label tokens, as the
plain cross-entropy is. T^2 keeps the KL term's gradients at the size of the CE's when the
temperature softens both distributions (Hinton et al., 2015).

Only the student's LoRA adapter trains. The teacher runs in eval mode under ``no_grad``: it
draws no random numbers, so checkpoints need nothing of it and a resumed run stays exactly
the run that never stopped. Vocabularies are compared over the tokenizer's ids only: real
model families pad their embedding matrices to different sizes (a 7B Qwen2 has more rows
than a 0.5B one, with the same tokenizer), and the padding rows are no tokens at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cheapspot.contract import DistillationSettings, TeacherSource
from cheapspot.store import CorruptObjectError, NotFoundError, PermissionStoreError, Store
from cheapspot_worker.data import IGNORE
from cheapspot_worker.errors import PermanentError
from cheapspot_worker.loading import cache_dir, load_base_model, load_tokenizer, resolve_model_dir
from cheapspot_worker.progress import event

if TYPE_CHECKING:
    import torch

TEACHER = "distillation.teacher"


def check_same_tokenizer(student: Any, teacher: Any, student_uri: str, teacher_uri: str) -> None:
    """Raise PermanentError unless both tokenizers map the same strings to the same ids.

    Merges or normalisers may differ as long as the vocabulary is the same: the teacher never
    tokenizes anything itself, it reads the student's ids.
    """
    s_vocab: dict[str, int] = student.get_vocab()
    t_vocab: dict[str, int] = teacher.get_vocab()
    if s_vocab == t_vocab:
        return
    differ = sorted(tok for tok, i in s_vocab.items() if t_vocab.get(tok) != i)
    only_teacher = sorted(set(t_vocab) - set(s_vocab))
    examples = []
    for tok in differ[:3]:
        where = t_vocab.get(tok)
        examples.append(
            f"{tok!r} is {s_vocab[tok]} in the student, "
            + ("absent in the teacher" if where is None else f"{where} in the teacher")
        )
    for tok in only_teacher[: max(0, 3 - len(examples))]:
        examples.append(f"{tok!r} is only in the teacher ({t_vocab[tok]})")
    raise PermanentError(
        f"{TEACHER} {teacher_uri} and model {student_uri} do not share a tokenizer "
        f"(student: {len(s_vocab)} tokens, teacher: {len(t_vocab)}; {len(differ)} of the "
        f"student's tokens differ or are missing, {len(only_teacher)} are only in the teacher; "
        f"{'; '.join(examples)}): logits distillation compares the two models token by token, "
        "so pick a teacher of the student's model family (same tokenizer)"
    )


def fetch_teacher_adapter(uri: str) -> str:
    """Download a published PEFT adapter directory (verified against its manifest)."""
    dest = cache_dir() / "adapters" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        Store(uri).fetch("", dest)
    except NotFoundError as exc:
        raise PermanentError(
            f"{TEACHER}.adapterUri {uri} is not a published adapter directory: {exc}"
        ) from exc
    except (PermissionStoreError, CorruptObjectError) as exc:
        raise PermanentError(f"{TEACHER}.adapterUri {uri} cannot be read: {exc}") from exc
    if not (dest / "adapter_config.json").is_file():
        raise PermanentError(
            f"{TEACHER}.adapterUri {uri} has no adapter_config.json: not a PEFT adapter"
        )
    return str(dest)


def _with_adapter(model: Any, source: TeacherSource) -> Any:
    if source.adapter_uri is None:
        return model
    from peft import PeftModel

    directory = fetch_teacher_adapter(source.adapter_uri)
    try:
        wrapped = PeftModel.from_pretrained(model, directory, is_trainable=False)
    except Exception as exc:
        raise PermanentError(
            f"{TEACHER}.adapterUri {source.adapter_uri} does not fit the teacher "
            f"{source.uri}: {type(exc).__name__}: {exc}"
        ) from exc
    # Merged, the teacher costs one matmul per layer, not three; a quantized base cannot be
    # merged into, so there the adapter stays alongside.
    merged = wrapped if source.quantization.value != "none" else wrapped.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged


@dataclass
class Parts:
    """The two terms of a distillation loss, each already divided by the step's label tokens."""

    kl: float = 0.0
    ce: float = 0.0


class Teacher:
    """The frozen teacher and the settings of the loss it takes part in."""

    def __init__(self, model: Any, vocab: int, settings: DistillationSettings) -> None:
        self.model = model
        self.vocab = vocab
        self.settings = settings

    @classmethod
    def load(
        cls,
        settings: DistillationSettings,
        student_tokenizer: Any,
        student_uri: str,
        student_vocab: int,
        *,
        cuda: bool,
        device: Any,
    ) -> Teacher:
        source = settings.teacher
        try:
            directory = resolve_model_dir(source)
        except PermanentError as exc:
            raise PermanentError(f"{TEACHER}: {exc}") from exc
        tokenizer = load_tokenizer(directory, source.uri)
        check_same_tokenizer(student_tokenizer, tokenizer, student_uri, source.uri)
        model = load_base_model(directory, source, cuda=cuda, trainable=False, what=TEACHER)
        model = _with_adapter(model, source)
        if source.quantization.value == "none":
            model.to(device)
        # Rows both output layers have for the tokenizer's ids. A tokenizer may list a token
        # or two more than the model has rows (Qwen2's adds one for the tiny models here):
        # ids the student cannot predict take no part in the comparison.
        teacher_vocab = int(model.get_output_embeddings().weight.shape[0])
        vocab = min(len(student_tokenizer), student_vocab, teacher_vocab)
        event(
            "teacher_loaded",
            teacher=source.uri,
            adapter=source.adapter_uri,
            parameters=sum(p.numel() for p in model.parameters()),
            vocab=vocab,
        )
        return cls(model, vocab, settings)

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            out: torch.Tensor = self.model(input_ids=ids, attention_mask=mask).logits
        return out

    def loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        label_tokens: int,
    ) -> tuple[torch.Tensor, Parts]:
        """The micro-batch's share of the step's loss, and its KL and CE parts."""
        s = self.settings
        kl, ce = distillation_terms(
            student_logits, teacher_logits, labels, vocab=self.vocab, temperature=s.temperature
        )
        t2 = s.temperature * s.temperature
        loss = (s.alpha * t2 * kl + (1.0 - s.alpha) * ce) / label_tokens
        return loss, Parts(float(kl.detach()) / label_tokens, float(ce.detach()) / label_tokens)


def distillation_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KL(teacher_T || student_T) and summed CE over the predicted label positions.

    Position t predicts token t+1, as in training; positions whose next label is ignored
    (prompt, padding) take part in neither term.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    target = labels[:, 1:]
    keep = target != IGNORE
    student = student_logits[:, :-1].float()
    ce = F.cross_entropy(
        student.reshape(-1, student.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    s = student[keep][:, :vocab] / temperature
    t = teacher_logits[:, :-1][keep][:, :vocab].float() / temperature
    if s.numel() == 0:
        return torch.zeros((), device=ce.device), ce
    kl = F.kl_div(
        F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum"
    )
    return kl, ce


def mean_token_kl(
    student: Any,
    teacher: Any,
    examples: list[tuple[list[int], list[int]]],
    *,
    vocab: int,
    temperature: float = 1.0,
) -> float:
    """KL(teacher || student) per predicted label token over ``(input_ids, labels)`` pairs.

    An evaluation helper (held-out prompts): one sequence at a time, no padding involved.
    """
    import torch

    total, tokens = 0.0, 0
    student.eval()
    with torch.no_grad():
        for ids, labels in examples:
            x = torch.tensor([ids])
            y = torch.tensor([labels])
            kl, _ = distillation_terms(
                student(input_ids=x).logits,
                teacher(input_ids=x).logits,
                y,
                vocab=vocab,
                temperature=temperature,
            )
            total += float(kl)
            tokens += sum(1 for v in labels[1:] if v != IGNORE)
    return total / max(1, tokens)


def describe(settings: DistillationSettings) -> dict[str, Any]:
    """How a job distilled, for the final adapter's manifest and training_summary.json."""
    t = settings.teacher
    if settings.sequences:
        return {
            "mode": settings.mode.value,
            "teacher": t.uri,
            "teacher_adapter": t.adapter_uri,
            "teacher_quantization": t.quantization.value,
            "generation": settings.sampling.model_dump(mode="json", by_alias=True),
            "loss": "cross-entropy on the teacher's completions (sequence-level distillation)",
        }
    return {
        "mode": settings.mode.value,
        "teacher": t.uri,
        "teacher_adapter": t.adapter_uri,
        "teacher_quantization": t.quantization.value,
        "temperature": settings.temperature,
        "alpha": settings.alpha,
        "loss": "alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy",
    }
