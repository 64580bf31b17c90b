"""Where bundles come from: KV now (kv.py), PKI next. A source returns file name -> PEM bytes."""
