"""The data stage: raw images + texts -> validated, normalized, training-ready conversations.

Modules, one concern each: :mod:`~visiontune.data.io` (reading annotation sources), :mod:`~.probe`
(per-image facts), :mod:`~.validate` (Great Expectations suites, quarantine), :mod:`~.normalize`
(content-addressed resizing), :mod:`~.conversation` (the message format), :mod:`~.convert` (the split
DatasetDict) and :mod:`~.demo` (the bundled offline handwriting demo). Heavy imports stay inside
functions, so importing this package is cheap.
"""

from visiontune.data.conversation import to_conversation, to_conversations

__all__ = ["to_conversation", "to_conversations"]
