"""Bring your own characters: MMRole-style data for new characters and images, written by a teacher model.

Pure core (no Ray): the characters-file schema (:mod:`.config`), prompt templates (:mod:`.templates`), the teacher
client (:mod:`.teacher`), tolerant reply parsing (:mod:`.parse`), quality gates (:mod:`.gates`, :mod:`.dedup`),
the published-layout writers (:mod:`.writer`), the per-item cache (:mod:`.cache`), cost (:mod:`.cost`), Character
Card V2 import/export (:mod:`.cards`) and the run itself (:mod:`.pipeline`). Ray Data glue: ``mmrole.ray_datagen``.
"""
