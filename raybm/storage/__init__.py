"""Where raybm keeps what it makes: the results tree's names (``layout``), local and S3
files (``fs``), the results root (``results``), what the records mean (``records``), the
leases that keep two jobs off one artifact (``lease``) and the node-local model cache
(``model_cache``)."""
