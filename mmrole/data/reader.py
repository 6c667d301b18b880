"""Reader for the published MMRole dataset layout (``MMRole_dataset``), quirks included.

Layout understood::

    profiles/{in-distribution,out-of-distribution}/roles.json          {script: [role, ...]}
    profiles/<group>/profiles.json                                     {role: markdown profile}
    profiles/<group>/detailed_profiles/<Role_Stem>.json, meta_info_hypo/<Role_Stem>.json
    dialogues/in-distribution/{comment,human-role,inter-role}/<Role_Stem>_{COCO,script}.json
    dialogues/out-of-distribution/{comment,human-role,inter-role}.json
    images/annotations.json, images/**                                  (COCO under images/COCO/train2017/)
    data/train/*.json, data/test/<group>/<type>_test.json, RM_data/{train,test}/*.json

Problems are collected (file, id, message) instead of raised, so one bad file never hides the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from .records import (
    DEFAULT_HUMAN_NAME,
    DIALOGUE_ID_INFIX,
    DIALOGUE_TYPES,
    GROUPS,
    HUMAN_SPEAKER,
    HYPOTHETICAL_SCRIPT,
    Character,
    Dialogue,
    ImageRef,
    Sample,
    Turn,
    infer_kind,
    infer_language,
    role_file_stem,
)

_HUMAN_ALIASES = {"human", "user"}
_MODEL_ALIASES = {"gpt", "assistant", "bot", "model"}
_IMG_TAG = re.compile(r"Picture \d+:\s*<img>(.*?)</img>\n?", re.DOTALL)
_TEST_FILE = re.compile(r"^(comment|human-role|inter-role)_test\.json$")


@dataclass
class Problem:
    level: str  # "error" | "warning"
    file: str
    id: str
    code: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}" + (f" [{self.id}]" if self.id else "")
        return f"{self.level.upper()} {where}: {self.message}"


class DatasetError(ValueError):
    """The dataset root is unusable (missing layout); the message names the path."""


def read_json(path: Path, problems: Optional[list] = None, expect=None):
    """Parse a JSON file; on failure record an error Problem (or raise when ``problems`` is None)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"cannot parse JSON: {e}"
        if problems is None:
            raise DatasetError(f"{path}: {msg}") from e
        problems.append(Problem("error", str(path), "", "bad_json", msg))
        return None
    if expect is not None and not isinstance(data, expect):
        msg = f"expected a JSON {expect.__name__}, got {type(data).__name__}"
        if problems is None:
            raise DatasetError(f"{path}: {msg}")
        problems.append(Problem("error", str(path), "", "bad_json", msg))
        return None
    return data


def _clean(v) -> Optional[str]:
    """Annotation values: empty strings mean absent."""
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def image_path_from_tag(text: str) -> tuple[Optional[str], str]:
    """Split a Qwen-VL style ``Picture 1: <img>PATH</img>`` prefix off a user text.

    Returns (path relative to images/, remaining text). Absolute paths from the authors' machines are cut
    to the part after the last ``images/``.
    """
    m = _IMG_TAG.search(text)
    if not m:
        return None, text
    path = m.group(1).strip()
    if "images/" in path:
        path = path.rsplit("images/", 1)[1]
    return path, (text[: m.start()] + text[m.end() :]).strip("\n")


@dataclass
class MMRoleDataset:
    """A published-layout MMRole dataset root, read lazily (dialogue files are streamed)."""

    root: Path
    characters: dict[str, Character] = field(default_factory=dict)
    annotations: dict[str, ImageRef] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    _stems: dict[str, str] = field(default_factory=dict)

    @property
    def images_root(self) -> Path:
        return self.root / "images"

    # ---- characters -------------------------------------------------------------------------
    def _load_profiles(self) -> None:
        for group in GROUPS:
            pdir = self.root / "profiles" / group
            if not pdir.is_dir():
                if group == "in-distribution":
                    self.problems.append(Problem("error", str(pdir), "", "missing", "profiles folder missing"))
                continue
            roles = read_json(pdir / "roles.json", self.problems, dict) if (pdir / "roles.json").exists() else None
            profiles = (
                read_json(pdir / "profiles.json", self.problems, dict) if (pdir / "profiles.json").exists() else None
            )
            if roles is None or profiles is None:
                missing = [n for n, v in (("roles.json", roles), ("profiles.json", profiles)) if v is None]
                self.problems.append(Problem("error", str(pdir), "", "missing", f"missing or unreadable {missing}"))
                roles, profiles = roles or {}, profiles or {}
            for script, names in roles.items():
                for name in names:
                    profile = profiles.get(name)
                    if not profile:
                        self.problems.append(
                            Problem(
                                "error",
                                str(pdir / "profiles.json"),
                                name,
                                "no_profile",
                                f"role {name!r} of {script!r} has no profile",
                            )
                        )
                        profile = ""
                    structured = None
                    stem = role_file_stem(name)
                    for sub in ("detailed_profiles", "meta_info_hypo"):
                        f = pdir / sub / f"{stem}.json"
                        if f.exists():
                            structured = read_json(f, self.problems, dict)
                    if name in self.characters:
                        self.problems.append(
                            Problem(
                                "warning",
                                str(pdir / "roles.json"),
                                name,
                                "duplicate_role",
                                "role listed more than once; first entry kept",
                            )
                        )
                        continue
                    self.characters[name] = Character(
                        name=name,
                        script=script,
                        group=group,
                        kind=infer_kind(script),
                        language=infer_language(name, profile),
                        profile=profile,
                        structured_profile=structured,
                    )
                    self._stems[stem] = name
            for name in profiles:
                if not any(name in v for v in roles.values()):
                    self.problems.append(
                        Problem(
                            "warning",
                            str(pdir / "profiles.json"),
                            name,
                            "unlisted_role",
                            "profile for a role not listed in roles.json",
                        )
                    )

    def _load_annotations(self) -> None:
        f = self.images_root / "annotations.json"
        if not f.exists():
            self.problems.append(Problem("warning", str(f), "", "missing", "no image annotations"))
            return
        data = read_json(f, self.problems, list) or []
        for i, a in enumerate(data):
            if not isinstance(a, dict) or not a.get("image"):
                self.problems.append(Problem("error", str(f), str(i), "bad_record", "annotation without 'image'"))
                continue
            self.annotations[a["image"]] = ImageRef(
                a["image"], _clean(a.get("role_info")), _clean(a.get("place_info")), _clean(a.get("scene_info"))
            )

    # ---- dialogues ---------------------------------------------------------------------------
    def dialogue_files(self) -> list[tuple[Path, str, str, Optional[str]]]:
        """(file, group, dialogue type, owner role or None) for every dialogue file present."""
        out = []
        ddir = self.root / "dialogues"
        for dtype in DIALOGUE_TYPES:
            for f in sorted((ddir / "in-distribution" / dtype).glob("*.json")):
                stem = re.sub(r"_(COCO|script)$", "", f.stem)
                out.append((f, "in-distribution", dtype, self._stems.get(stem, stem.replace("_", " "))))
            f = ddir / "out-of-distribution" / f"{dtype}.json"
            if f.exists():
                out.append((f, "out-of-distribution", dtype, None))
        return out

    def _owner_from_id(self, did: str, dtype: str) -> Optional[str]:
        infix = "_" + DIALOGUE_ID_INFIX[dtype] + "_"
        if infix in did:
            stem = did.split(infix)[0]
            return self._stems.get(stem, stem.replace("_", " "))
        return None

    def parse_dialogue(
        self, rec, file: Path, group: str, dtype: str, owner: Optional[str], index: int
    ) -> Optional[Dialogue]:
        """One raw dialogue record -> Dialogue, or None with a Problem recorded."""
        src = str(file)
        if not isinstance(rec, dict) or "id" not in rec:
            self.problems.append(Problem("error", src, f"#{index}", "bad_record", "dialogue record without 'id'"))
            return None
        did = str(rec["id"])
        owner = owner or self._owner_from_id(did, dtype)
        if not rec.get("image") or not isinstance(rec.get("image"), str):
            self.problems.append(Problem("error", src, did, "no_image", "dialogue has no image path"))
            return None
        path = rec["image"]
        ann = self.annotations.get(path)
        if any(k in rec for k in ("role_info", "place_info", "scene_info")):
            image = ImageRef(
                path, _clean(rec.get("role_info")), _clean(rec.get("place_info")), _clean(rec.get("scene_info"))
            )
        else:
            image = ann or ImageRef(path)
        turns = []
        convs = rec.get("conversations")
        if not isinstance(convs, list):
            self.problems.append(Problem("error", src, did, "bad_record", "'conversations' is not a list"))
            return None
        for j, t in enumerate(convs):
            if not isinstance(t, dict) or not isinstance(t.get("value"), str):
                self.problems.append(Problem("error", src, did, "bad_turn", f"turn {j} has no text 'value'"))
                return None
            speaker = t.get("role", t.get("from"))
            if not isinstance(speaker, str) or not speaker:
                self.problems.append(Problem("error", src, did, "bad_turn", f"turn {j} has no speaker"))
                return None
            if speaker.lower() in _HUMAN_ALIASES:
                speaker = HUMAN_SPEAKER
            elif speaker.lower() in _MODEL_ALIASES and owner:
                speaker = owner
            turns.append(Turn(speaker, t["value"]))
        return Dialogue(
            id=did, type=dtype, image=image, turns=tuple(turns), owner=owner or "", group=group, source_file=src
        )

    def iter_dialogues(self, files=None) -> Iterator[Dialogue]:
        """Stream every dialogue, file by file; records that cannot be parsed are reported as problems."""
        for f, group, dtype, owner in files or self.dialogue_files():
            data = read_json(f, self.problems, list)
            if data is None:
                continue
            for i, rec in enumerate(data):
                d = self.parse_dialogue(rec, f, group, dtype, owner, i)
                if d is not None:
                    yield d

    # ---- rendered splits ---------------------------------------------------------------------
    def test_files(self) -> list[tuple[Path, str, str]]:
        """(file, group, type) of the published test split under data/test."""
        out = []
        for group in GROUPS:
            for f in sorted((self.root / "data" / "test" / group).glob("*_test.json")):
                m = _TEST_FILE.match(f.name)
                if m:
                    out.append((f, group, m.group(1)))
        return out

    def iter_test_samples(self) -> Iterator[Sample]:
        for f, group, dtype in self.test_files():
            yield from read_test_file(f, group, dtype, self.problems)

    def iter_conversation_file(self, f: Path, dialogue_type: str, system: str = "") -> Iterator[Sample]:
        """data/train and RM_data files: ``{id, conversations: [{from: user|assistant, value}]}``."""
        data = read_json(f, self.problems, list)
        for i, rec in enumerate(data or []):
            sid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
            convs = rec.get("conversations") if isinstance(rec, dict) else None
            if not isinstance(convs, list) or len(convs) < 2 or not all(isinstance(c, dict) for c in convs[:2]):
                self.problems.append(Problem("error", str(f), sid, "bad_record", "needs a user and an assistant turn"))
                continue
            user, answer = convs[0].get("value"), convs[1].get("value")
            if not isinstance(user, str) or not isinstance(answer, str):
                self.problems.append(Problem("error", str(f), sid, "bad_turn", "turn without text"))
                continue
            image, text = image_path_from_tag(user)
            if image is None:
                self.problems.append(Problem("error", str(f), sid, "no_image", "user text has no <img> tag"))
                continue
            yield Sample(
                id=sid,
                system=str(rec.get("system") or system),
                user_text=text,
                image=image,
                target=answer,
                role="",
                other_role="",
                script="",
                dialogue_type=dialogue_type,
                k=0,
            )


def read_test_file(f: Path, group: str, dtype: str, problems: Optional[list] = None) -> Iterator[Sample]:
    """Samples from a published test file (``{id, system, image, conversations[2], role, script, other_role}``).

    Also reads the published answers/reviews files, which are the same records with extra fields.
    """
    probs = problems if problems is not None else []
    data = read_json(Path(f), probs, list)
    if data is None and problems is None:
        raise DatasetError(str(probs[-1]))
    for i, rec in enumerate(data or []):
        sid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
        try:
            convs = rec["conversations"]
            user, target = convs[0]["value"], convs[1]["value"]
            k = int(sid.rsplit("_", 1)[1])
            sample = Sample(
                id=sid,
                system=rec.get("system", ""),
                user_text=user,
                image=rec["image"],
                target=target,
                role=rec["role"],
                other_role=rec.get("other_role") or DEFAULT_HUMAN_NAME,
                script=rec.get("script", ""),
                dialogue_type=dtype,
                k=k,
                group=group,
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            msg = f"malformed test record ({type(e).__name__}: {e})"
            if problems is None:
                raise DatasetError(f"{f} [{sid}]: {msg}") from e
            probs.append(Problem("error", str(f), sid, "bad_record", msg))
            continue
        yield sample


def load_dataset(root: Union[str, Path]) -> MMRoleDataset:
    """Open a published-layout dataset root: profiles and annotations are read now, dialogues on demand."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist")
    if not (root / "profiles").is_dir():
        raise DatasetError(f"{root}: not an MMRole dataset root (no profiles/ folder)")
    ds = MMRoleDataset(root=root)
    ds._load_profiles()
    ds._load_annotations()
    return ds


__all__ = [
    "MMRoleDataset",
    "Problem",
    "DatasetError",
    "load_dataset",
    "read_test_file",
    "image_path_from_tag",
    "HYPOTHETICAL_SCRIPT",
]
