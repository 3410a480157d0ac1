"""One ``LightningModule`` per technique (``lit_align.SFT``, ``lit_align.DPO``, ...), built on
``base.AlignModule``; the shared bases for reference models (``reference.py``), online methods
(``online.py``) and online preference methods (``online_preference.py``)."""
