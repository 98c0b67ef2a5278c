"""The shard sample format (docs/shard_format.md): the one layer that sharding, the data pipeline,
validation, prediction and the registry model import downward; it imports none of them.

- :mod:`schema`: ``FORMAT_VERSION`` and the member list with dtypes, axis kinds and encodings;
- :mod:`sample`: the typed :class:`Sample` and its :class:`Meta`;
- :mod:`codec`: one encode and one decode between a :class:`Sample` and tar member bytes;
- :mod:`check`: the one check of a sample against the schema and a manifest's sizes;
- :mod:`manifest`: the typed :class:`Manifest` of a shard folder, refusing other format versions and
  a content that does not match its checksum; :func:`write_manifest`, the one writer;
- :mod:`tar`: tar shards written and read through webdataset;
- :mod:`reader`: the one checked reader of a manifest's shards (size, sha256, members, schema) under
  ``data.on_corrupt``.
"""
