# Puma 5.6 settings for running under holdfast (puma -C puma.rb ...).
#
# queue_requests false: without it, Puma's drain (TERM) closes at once every
# connection that has no request bytes read yet -- one accepted a moment
# before the signal whose request is still on its way, and every idle
# keep-alive connection -- and those requests fail (a reset, no answer).
# With it, each accepted connection gets a thread that waits for its request
# and answers it, also while draining, and every response says
# `Connection: close`, so no client reuses a connection Puma may close.
# Puma then accepts only while it has a free thread; the rest wait in
# holdfast's listen queue for whichever worker is next.
queue_requests false

# How long a thread waits for the first request bytes of a connection. A
# drain can last this long, so keep holdfast's drain_timeout above it.
first_data_timeout 30
