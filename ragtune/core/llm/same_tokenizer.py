"""Soft-label distillation's precondition: the teacher's token log-probabilities only teach a student that
shares its tokenizer."""

from __future__ import annotations

from ragtune.core.errors import UserFacingError


class TokenizerMismatch(UserFacingError, ValueError):
    """Teacher and student do not share a tokenizer, so the teacher's token log-probabilities mean nothing to the
    student (soft-label distillation)."""


def check_same_tokenizer(teacher: str, student: str, trust_remote_code: bool = False) -> None:
    """Raise TokenizerMismatch unless `teacher` and `student` (model ids, paths or ragtune aliases) have the same
    vocabulary: every token string maps to the same id, added tokens included."""
    from ragtune.core.models import load_tokenizer

    try:
        teacher_vocab = load_tokenizer(teacher, trust_remote_code).get_vocab()
    except Exception as err:  # noqa: BLE001 - any load failure means "cannot check"
        raise TokenizerMismatch(
            f"soft-label distillation needs the teacher's tokenizer to check it is the student's, and the tokenizer "
            f"of {teacher!r} does not load ({type(err).__name__}: {err}). Set train.distillation.teacher_tokenizer "
            "to the teacher's Hugging Face id or folder (an endpoint's served name is not one).") from None
    student_vocab = load_tokenizer(student, trust_remote_code).get_vocab()
    if teacher_vocab == student_vocab:
        return
    differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:3]
    raise TokenizerMismatch(
        f"the teacher {teacher!r} and the student {student!r} do not share a tokenizer ({len(teacher_vocab)} vs "
        f"{len(student_vocab)} tokens; e.g. {', '.join(f'{t!r}={i}' for t, i in differ)} is in one only): the "
        "teacher's token log-probabilities cannot teach this student. Use a teacher of the student's family (e.g. "
        "a larger model of the same series), or remove train.distillation and train on the teacher's text alone.")
