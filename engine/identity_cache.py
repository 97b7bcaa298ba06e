"""Values kept per live object, by identity, for as long as that object lives.

Module-level caches keyed by `id(obj)` outlive their objects: the id of a freed tokenizer or
table can be reused by the next one (a wrong hit), and the entries, with the device tensors
they hold, are never freed (a model reload leaks them). An `IdentityCache` keys by identity
but holds its objects weakly: an entry goes when its object is collected. It works for
unhashable objects (dataclasses), which a WeakKeyDictionary does not take. A value must not
refer to its own object, or the object never dies.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any


class IdentityCache:
    """`get(obj)` / `put(obj, value)` by identity; entries die with their objects."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()

    def get(self, obj: object) -> Any:
        found = self._items.get(id(obj))
        if found is None or found[0]() is not obj:
            return None
        return found[1]

    def put(self, obj: object, value: Any) -> Any:
        key = id(obj)
        items, lock = self._items, self._lock

        def gone(ref: weakref.ref) -> None:
            with lock:
                if key in items and items[key][0] is ref:
                    del items[key]

        with lock:
            items[key] = (weakref.ref(obj, gone), value)
        return value

    def __len__(self) -> int:
        return len(self._items)
