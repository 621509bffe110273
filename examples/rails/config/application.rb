# Only the parts of Rails this app uses: no Active Record (no database), no
# assets, no mailers. Without a Gemfile, Bundler is never loaded.
require "rails"
require "action_controller/railtie"

module HoldfastRails
  class Application < Rails::Application
    config.load_defaults 6.1
    config.root = File.expand_path("..", __dir__)
    config.eager_load = true
    # Production wants a secret; a real app reads it from credentials or
    # the environment (holdfast's [app] env).
    config.secret_key_base = ENV.fetch("SECRET_KEY_BASE") { "holdfast-example-" * 4 }
    config.require_master_key = false
    # Requests come through 127.0.0.1 and a proxy's Host header.
    config.hosts.clear
    # Log to stdout, one line at a time: holdfast owns the file (README,
    # "Logs"), so rotation never touches a worker.
    $stdout.sync = true
    config.logger = ActiveSupport::Logger.new($stdout)
    config.log_level = :info
    config.consider_all_requests_local = false
  end
end
