"""Driver-side deployment: the Serve config file (:mod:`serving.deploy.config`) and starting Serve,
deploying and waiting for readiness (:mod:`serving.deploy.launch`). Nothing here runs in a
replica."""
