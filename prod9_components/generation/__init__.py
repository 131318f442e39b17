"""Generation of both families: one seeded loop (:mod:`.loop`) over the items a user passes (:mod:`.inputs`), each
sampled and decoded (:mod:`.decode`) by a family's sample function (:mod:`.maskgit`, :mod:`.maisi`) and written by
one saver (:mod:`.saver`)."""
