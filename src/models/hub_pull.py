"""Downloads one model from a Hugging Face-compatible hub into a folder (ferrotune's hub pull).

Run by `ferrotune` (src/models/hub.rs) with the training environment's Python, which has
`huggingface_hub`: the well-kept client does the HTTP (endpoint, token, redirects, retries,
resuming a file from its `.incomplete` part with a Range request). This script picks the
files a model needs, reports progress and verifies every file against the hub's checksums
(sha256 for LFS files, the git blob id for small ones), which huggingface_hub does not do.

Input: one JSON object on stdin: repo, revision (or null), endpoint (or null), token (or
null), dest (the partial folder). Output: JSON lines on stdout:
  {"event": "plan", "commit": sha, "files": [{"name", "size"}], "total": bytes}
  {"event": "progress", "file": name, "bytes": n, "done_bytes": all files so far}
  {"event": "file", "name": name, "size": n}
  {"event": "done", "commit": sha}
  {"event": "error", "kind": "not_found|gated|unauthorized|revision|no_weights|checksum|network|other", "message": m}
"""

import hashlib
import json
import os
import sys
import threading
import time


def emit(**event):
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def fail(kind, message):
    emit(event="error", kind=kind, message=message)
    sys.exit(2)


# Files beside the weights that training (transformers) and chat (tokenizer, template) read.
SIDE_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "README.md",
    "NOTICE",
}


def wanted(siblings):
    """Only the files a model needs: top-level safetensors weights and the side files."""
    names = {s.rfilename for s in siblings}
    weights = sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
    # Mistral-style repos carry the same weights twice (consolidated.* for their own loader).
    if any(n.startswith("model") for n in weights):
        weights = [n for n in weights if not n.startswith("consolidated")]
    if not weights:
        others = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf")))
        hint = f" (it has {', '.join(others[:4])})" if others else ""
        fail(
            "no_weights",
            f"the repository has no safetensors weights{hint}; ferrotune loads safetensors "
            "(a .gguf can be registered from a folder instead)",
        )
    if "config.json" not in names:
        fail("no_weights", "the repository has no config.json: it is not a transformers model")
    keep = set(weights) | (names & SIDE_FILES)
    return [s for s in siblings if s.rfilename in keep]


def git_blob_sha1(path, size):
    h = hashlib.sha1()
    h.update(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path, sibling):
    size = os.path.getsize(path)
    expected_size = sibling.lfs.size if sibling.lfs else sibling.size
    if expected_size is not None and size != expected_size:
        return f"{sibling.rfilename}: {size} bytes, the hub says {expected_size}"
    if sibling.lfs is not None and sibling.lfs.sha256:
        got = sha256(path)
        if got != sibling.lfs.sha256:
            return f"{sibling.rfilename}: sha256 {got}, the hub says {sibling.lfs.sha256}"
    elif sibling.blob_id:
        got = git_blob_sha1(path, size)
        if got != sibling.blob_id:
            return f"{sibling.rfilename}: git blob {got}, the hub says {sibling.blob_id}"
    return None


def main():
    args = json.load(sys.stdin)
    # Progress bars would go to stderr as noise: ferrotune reports progress itself.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import errors

    repo, dest = args["repo"], args["dest"]
    endpoint = args.get("endpoint") or None
    token = args.get("token") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo, revision=args.get("revision") or None, files_metadata=True)
    except errors.GatedRepoError as e:
        fail("gated", f"{repo} is gated: accept its terms on the hub and set a token ({first_line(e)})")
    except errors.RevisionNotFoundError as e:
        fail("revision", f"no revision `{args.get('revision')}` in {repo} ({first_line(e)})")
    except errors.RepositoryNotFoundError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            fail("unauthorized", f"{repo} was not found or needs a token the hub accepts ({first_line(e)})")
        fail("not_found", f"no model {repo} on the hub ({first_line(e)})")
    except errors.HfHubHTTPError as e:
        fail("network", f"the hub answered: {first_line(e)}")
    except Exception as e:  # connection refused, DNS, TLS
        fail("network", f"cannot reach the hub: {type(e).__name__}: {first_line(e)}")

    commit = info.sha
    if not commit:
        fail("other", "the hub did not say which commit the revision is")
    files = wanted(info.siblings or [])
    sizes = {s.rfilename: (s.lfs.size if s.lfs else s.size) or 0 for s in files}
    emit(
        event="plan",
        commit=commit,
        files=[{"name": s.rfilename, "size": sizes[s.rfilename]} for s in files],
        total=sum(sizes.values()),
    )
    done_bytes = 0
    for s in files:
        name = s.rfilename
        final = os.path.join(dest, name)
        # A file complete from an earlier attempt is kept when it still checks out.
        if os.path.isfile(final) and verify(final, s) is None:
            done_bytes += sizes[name]
            emit(event="file", name=name, size=sizes[name], reused=True)
            continue
        watcher = Watcher(dest, name, done_bytes)
        watcher.start()
        try:
            path = hf_hub_download(
                repo, name, revision=commit, local_dir=dest, endpoint=endpoint, token=token
            )
        except errors.GatedRepoError as e:
            fail("gated", f"{repo} is gated: set a token the hub accepts ({first_line(e)})")
        except errors.HfHubHTTPError as e:
            fail("network", f"{name}: the hub answered: {first_line(e)}")
        except Exception as e:
            fail("network", f"{name}: {type(e).__name__}: {first_line(e)}")
        finally:
            watcher.stop()
        problem = verify(path, s)
        if problem is not None:
            os.remove(path)
            fail("checksum", f"checksum mismatch, removed the file: {problem}")
        done_bytes += sizes[name]
        emit(event="file", name=name, size=sizes[name])
    emit(event="done", commit=commit)


def first_line(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class Watcher(threading.Thread):
    """Reports a file's growth from its `.incomplete` part while huggingface_hub writes it."""

    def __init__(self, dest, name, done_bytes):
        super().__init__(daemon=True)
        self.folder = os.path.join(dest, ".cache", "huggingface", "download", os.path.dirname(name))
        self.prefix = os.path.basename(name) + "."
        self.name_, self.done_bytes = name, done_bytes
        self.stopped = threading.Event()

    def run(self):
        last = -1
        while not self.stopped.wait(1.0):
            size = 0
            try:
                for entry in os.scandir(self.folder):
                    if entry.name.startswith(self.prefix) and entry.name.endswith(".incomplete"):
                        size = max(size, entry.stat().st_size)
            except OSError:
                continue
            if size != last:
                last = size
                emit(event="progress", file=self.name_, bytes=size, done_bytes=self.done_bytes + size)

    def stop(self):
        self.stopped.set()
        self.join(timeout=2)


if __name__ == "__main__":
    main()
