# A minimal Rails 6.1 app for holdfast's tests (tests/rails.rs) and for
# trying holdfast with a real Rails boot:
#
#   holdfast run --config examples/rails.toml
#
# It boots from Debian's ruby-rails (6.1) without Bundler or a Gemfile:
# config/application.rb requires only the railties it uses.
require_relative "config/environment"

run Rails.application
