"""ckptstore: crash-safe redefinition and validation of libvirt checkpoint chains.

A host agent keeps its management system's checkpoint chain in libvirt with
one :class:`Store`::

    import ckptstore

    store = ckptstore.Store("/var/lib/ckptstore/journal.db", connect="qemu:///system")
    store.recover()              # at start-up: finish what a killed run left open
    report = store.sync(chain)   # make libvirt's checkpoints exactly the chain

Every method returns the document ``ckptstore --json`` prints for the same
call, as a dict (the library's own types, converted through serde: one wire
format). Every failure raises :class:`Error` or one of its subclasses, whose
``exit_code`` and ``hint`` are the command's:

==================  =========  ===========================================
class               exit code  meaning
==================  =========  ===========================================
:class:`RolledBack`    1       libvirt refused a step; libvirt is as it was
:class:`BadInput`      2       bad input; nothing was changed anywhere
:class:`Busy`          3       a live process or thread holds the domain
:class:`Unreachable`   4       libvirt unreachable, no such domain, or a
                               transaction left open for ``recover``
:class:`JournalError`  5       the journal cannot be used
==================  =========  ===========================================

The extension (``ckptstore._native``) is the Rust library itself, linked
against the system's ``libvirt.so.0``; the GIL is released while it works.
"""

from ._native import (
    BadInput,
    Busy,
    Error,
    JournalError,
    RolledBack,
    Store,
    Unreachable,
    __version__,
)

__all__ = [
    "BadInput",
    "Busy",
    "Error",
    "JournalError",
    "RolledBack",
    "Store",
    "Unreachable",
    "__version__",
]
