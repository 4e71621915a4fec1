"""peftbench: which fine-tuning method should I use for this model, this data and this GPU?"""

import logging

# bitsandbytes warns on every import that an optional CPU kernel package is absent; it changes nothing here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
