"""Drafter training items from local files, in place of the demo generator for a modality.

Formats (one exchange per record: the first human turn is the prompt, the model turn right after it
the dataset answer; system turns and later turns are ignored):
- text, ShareGPT-style JSONL: one object per line, `{"conversations": [{"from": "human", "value":
  ...}, {"from": "gpt", "value": ...}]}` (roles human/user, gpt/assistant/chatgpt/bing/bard, system)
  or `{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}`;
  blank lines are skipped.
- multimodal, LLaVA-style JSON: a list of `{"id": ..., "image": "relative/path.png",
  "conversations": [...]}` with paths relative to an image folder; the human turn holds at most one
  `<image>` placeholder, which is removed: the image goes where the target's chat template puts it.

Selection: of a file's records, `eval_samples` (a seeded draw) are held out for the acceptance
evaluation and never trained on; the training pool takes the others, or at most `--text-samples` /
`--image-samples` of them when given (0: no training items of that modality, e.g. a text-only
drafter still measured on held-out image records). Items become demo_world `Sample`s, so prompts
go through the target's chat template and images through its image processor exactly as demo
items do (demo_data.FeatureCollector). A malformed file raises InvalidArgument naming the file and
its line (JSONL) or record (JSON). This module reads files only: it loads no model.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from demo_world.data import Sample
from demo_world.tasks import Example
from draft_service.training.config import DataConfig, LocalFiles
from draft_service.training.demo_data import PoolItems, demo_items
from speculum.errors import InvalidArgument

USER_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard"})
SYSTEM_ROLES = frozenset({"system"})
IMAGE_PLACEHOLDER = "<image>"
TEXT_KIND, IMAGE_KIND = "sharegpt", "llava"  # Example.kind of file items


@dataclass(frozen=True)
class Record:
    """One record's exchange · where: file and line/record, for errors · image: its path, or None."""

    where: str
    prompt: str
    answer: str
    image: Path | None = None


@dataclass(frozen=True)
class RecordFile:
    """The records of one file and the sha256 of its bytes (part of the features cache key)."""

    path: Path
    sha256: str
    records: tuple[Record, ...]


@dataclass(frozen=True)
class LocalRecords:
    """The files' records per modality; None where the demo generator supplies the items."""

    text: RecordFile | None
    image: RecordFile | None
    image_folder: Path | None

    def fingerprint(self) -> dict:
        """What identifies the data in the features cache key (images by folder path only)."""
        found = {}
        for name, source in (("text_jsonl", self.text), ("llava_json", self.image)):
            if source is not None:
                found[name] = {"path": str(source.path.resolve()), "sha256": source.sha256}
        if self.image_folder is not None:
            found["image_folder"] = str(self.image_folder.resolve())
        return found


def read_local(files: LocalFiles) -> LocalRecords:
    """Read and validate every file of `files` (images are checked to exist, opened only later)."""
    return LocalRecords(
        None if files.text_jsonl is None else read_sharegpt_jsonl(files.text_jsonl),
        None if files.llava_json is None else read_llava_json(files.llava_json, files.image_folder),
        files.image_folder,
    )


def read_sharegpt_jsonl(path: Path) -> RecordFile:
    """ShareGPT-style JSONL: one conversation object per line."""
    raw = _read_bytes(path)
    records = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            hint = "; JSONL holds one JSON object per line" if line.lstrip().startswith("[") else ""
            raise InvalidArgument(where, f"not valid JSON ({err.msg}){hint}") from None
        prompt, answer = first_exchange(obj, where)
        if IMAGE_PLACEHOLDER in prompt:
            raise InvalidArgument(where, f"a text prompt must not contain {IMAGE_PLACEHOLDER} "
                                         "(image data goes in --llava-json)")
        records.append(Record(where, prompt, answer))
    if not records:
        raise InvalidArgument(str(path), "holds no records")
    return RecordFile(path, hashlib.sha256(raw).hexdigest(), tuple(records))


def read_llava_json(path: Path, image_folder: Path) -> RecordFile:
    """LLaVA-style JSON: a list of records with an image path (relative to `image_folder`)."""
    raw = _read_bytes(path)
    if not image_folder.is_dir():
        raise InvalidArgument(str(image_folder), "is not a folder (the image folder of the LLaVA JSON)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{path}:{getattr(err, 'lineno', 1)}", f"not valid JSON ({err})") from None
    if not isinstance(data, list) or not data:
        raise InvalidArgument(str(path), "must hold a non-empty JSON list of records")
    records = []
    for index, obj in enumerate(data):
        where = f"{path} record {index}" + (f" (id {obj['id']})" if isinstance(obj, dict) and "id" in obj else "")
        prompt, answer = first_exchange(obj, where)
        image = obj.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidArgument(where, 'needs "image": a path relative to the image folder '
                                         "(text-only records belong in --text-jsonl)")
        if prompt.count(IMAGE_PLACEHOLDER) > 1:
            raise InvalidArgument(where, f"one image per record: the human turn holds several {IMAGE_PLACEHOLDER}")
        prompt = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        if not prompt:
            raise InvalidArgument(where, f"the human turn holds no text besides {IMAGE_PLACEHOLDER}")
        if not (image_folder / image).is_file():
            raise InvalidArgument(where, f"image {image} not found in {image_folder}")
        records.append(Record(where, prompt, answer, image_folder / image))
    return RecordFile(path, hashlib.sha256(raw).hexdigest(), tuple(records))


def first_exchange(obj, where: str) -> tuple[str, str]:
    """(prompt, answer): the first human turn and the model turn right after it, system turns skipped."""
    if not isinstance(obj, dict):
        raise InvalidArgument(where, "must be a JSON object")
    if "conversations" in obj:
        turns, role_key, text_key = obj["conversations"], "from", "value"
    elif "messages" in obj:
        turns, role_key, text_key = obj["messages"], "role", "content"
    else:
        raise InvalidArgument(where, 'needs "conversations" (or "messages")')
    if not isinstance(turns, list):
        raise InvalidArgument(where, "the conversation must be a list of turns")
    spoken = []
    for number, turn in enumerate(turns):
        if not (isinstance(turn, dict) and isinstance(turn.get(role_key), str) and isinstance(turn.get(text_key), str)):
            raise InvalidArgument(where, f'turn {number} must be {{"{role_key}": string, "{text_key}": string}}')
        role = turn[role_key].lower()
        if role not in USER_ROLES | MODEL_ROLES | SYSTEM_ROLES:
            raise InvalidArgument(where, f"turn {number} has the unknown role {turn[role_key]!r}")
        if role not in SYSTEM_ROLES:
            spoken.append((role, turn[text_key].strip()))
    for position, (role, text) in enumerate(spoken):
        if role in USER_ROLES:
            if position + 1 == len(spoken) or spoken[position + 1][0] not in MODEL_ROLES:
                raise InvalidArgument(where, "the first human turn is not followed by a gpt (assistant) turn")
            answer = spoken[position + 1][1]
            if not text or not answer:
                raise InvalidArgument(where, "the prompt and its answer must not be empty")
            return text, answer
    raise InvalidArgument(where, "has no human (user) turn")


def train_count(requested: int | None, source: RecordFile | None, held_out: int, demo_default: int) -> int:
    """Training items of one pool: `requested`, by default `demo_default` demo items or every record
    of the file that is not held out; a file caps it at the records it has left."""
    if source is None:
        return demo_default if requested is None else requested
    left = len(source.records) - held_out
    if left < 0 or (left == 0 and requested != 0):
        raise InvalidArgument(str(source.path), f"has {len(source.records)} records: none left for training after "
                                                f"holding out {held_out} (--eval-samples)")
    return left if requested is None else min(requested, left)


def split_records(source: RecordFile, held_out: int, train: int, seed: int) -> tuple[list[Record], list[Record]]:
    """(training, held-out) records: a seeded draw of `held_out`, then up to `train` of the others
    (a function of the seed and the number of records only)."""
    order = list(range(len(source.records)))
    random.Random(f"drafter-file:{seed}").shuffle(order)
    picked = [source.records[i] for i in order]
    return picked[held_out : held_out + train], picked[:held_out]


class RecordSamples(Sequence[Sample]):
    """Records as demo_world Samples; an image is opened only when its item is read."""

    def __init__(self, records: Sequence[Record]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        if record.image is None:
            return Sample(Example(TEXT_KIND, record.prompt, record.answer), None)
        try:
            with Image.open(record.image) as image:
                pixels = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise InvalidArgument(record.where, f"cannot read image {record.image}: {err}") from None
        return Sample(Example(IMAGE_KIND, record.prompt, record.answer), pixels)


def pool_items(config: DataConfig, local: LocalRecords, multimodal: bool) -> PoolItems:
    """Every pool's items: split off the local file of a modality, else drawn from the demo world."""
    if local.image is not None and not multimodal:
        raise InvalidArgument(str(local.image.path), "the target is text-only: it takes no image data")
    if local.text is None:
        train_text = demo_items(config.text_samples, False, False, config.seed)
        eval_text = demo_items(config.eval_samples, False, True, config.seed)
    else:
        train_text, eval_text = map(RecordSamples, split_records(local.text, config.eval_samples, config.text_samples,
                                                                 config.seed))
    if not multimodal:
        train_image, eval_image = [], []
    elif local.image is None:
        train_image = demo_items(config.image_samples, True, False, config.seed)
        eval_image = demo_items(config.eval_samples, True, True, config.seed)
    else:
        train_image, eval_image = map(RecordSamples, split_records(local.image, config.eval_samples,
                                                                   config.image_samples, config.seed))
    return PoolItems(train_text, train_image, eval_text, eval_image)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InvalidArgument(str(path), "no such file")
    return path.read_bytes()
